"""Training data: augmentations, labelled image items, the P x K train loader and a padding-free validation loader."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torchvision.transforms import v2

from lookalike.core.errors import LookalikeError
from lookalike.core.table import DatasetTable
from lookalike.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, eval_transform
from lookalike.data.sampler import PKSampler, decode_index

AUGMENTS = ("none", "light", "reid")


def train_transform(
    kind: str, image_size: int | list[int], crop_fraction: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> v2.Compose:
    """Training augmentation: none (the eval transform), light (random resized crop + flip) or reid (pad-crop, flip,
    erasing)."""
    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if kind == "none":
        return eval_transform(image_size, crop_fraction, mean, std)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if kind == "light":
        steps = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        return v2.Compose([v2.ToImage(), *steps, *finish])
    if kind == "reid":  # Bag of Tricks: resize, flip, pad 10 + random crop, random erasing
        steps = [v2.Resize(size, antialias=True), v2.RandomHorizontalFlip(), v2.Pad(10), v2.RandomCrop(size)]
        return v2.Compose([v2.ToImage(), *steps, *finish, v2.RandomErasing(p=0.5)])
    raise LookalikeError(f"train.augment: expected one of {', '.join(AUGMENTS)}, got {kind!r}")


class LabelledImages(torch.utils.data.Dataset):
    """Train items (image, class index, valid): a negative index -(i+1) loads row i as a mock instance (valid False)."""

    def __init__(self, table: DatasetTable, transform: Callable) -> None:
        self.images = ImageDataset(table, transform)
        self.classes, self.labels = np.unique(table.labels.astype(str), return_inverse=True)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        row, valid = decode_index(index)
        return self.images[row][0], int(self.labels[row]), valid


class ShardSampler(torch.utils.data.Sampler[int]):
    """Rows rank, rank + R, rank + 2R, ...: every row on exactly one rank, no padding (so gathered metrics stay
    exact)."""

    def __init__(self, n: int) -> None:
        dist = torch.distributed
        ready = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class RetrievalDataModule(L.LightningDataModule):
    """The train split in P x K batches; the validation split in table order, sharded across ranks."""

    def __init__(
        self,
        table: DatasetTable,
        train_tf: Callable,
        eval_tf: Callable,
        p: int,
        k: int,
        few_images: str,
        seed: int,
        batch_size: int,
        num_workers: int,
        batches_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.train_table, self.val_table = table.split("train"), table.split("validation")
        if len(self.train_table) == 0:
            raise LookalikeError(f"{table.source}, column 'split': no train rows to learn from")
        self.train_set = LabelledImages(self.train_table, train_tf)
        self.val_set = ImageDataset(self.val_table, eval_tf)
        self.sampling = {"p": p, "k": k, "few_images": few_images, "seed": seed, "batches_per_epoch": batches_per_epoch}
        self.batch_size, self.num_workers = batch_size, num_workers
        self._sampler: PKSampler | None = None
        self._started: int | None = None  # the epoch start_epoch last set up
        PKSampler(self.train_set.labels, num_replicas=1, rank=0, **self.sampling)  # fail early on too few labels

    @property
    def n_classes(self) -> int:
        return len(self.train_set.classes)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        """P x K batches of the epoch the Trainer runs next: Lightning builds the batch iterator before any epoch-start
        hook, so a run resumed at epoch e must start there (it drew epoch 0's batches again). Workers are started
        anew each epoch, so that their augmentation seeds come from that epoch's seed (see start_epoch)."""
        self._sampler, self._started = PKSampler(self.train_set.labels, **self.sampling), None
        self.start_epoch(epoch_to_run(self.trainer))
        workers = self.num_workers
        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=self._sampler, num_workers=workers, persistent_workers=False
        )

    def start_epoch(self, epoch: int) -> None:
        """The sampler's batches and the augmentation RNG of `epoch`, from (train.seed, epoch) alone: an epoch trains
        the same whatever ran before it (a resumed run equals an uninterrupted one). Once per epoch: later calls for
        the same epoch (the epoch-start hook after train_dataloader) change nothing."""
        if self._sampler is None or epoch == self._started:
            return
        self._started = epoch
        self._sampler.set_epoch(epoch)
        torch.manual_seed(epoch_seed(self.sampling["seed"], epoch))  # transforms (and worker seeds) draw from it

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.val_set, batch_size=self.batch_size, sampler=ShardSampler(len(self.val_set)))

    def _loader(self, dataset, **kwargs) -> torch.utils.data.DataLoader:
        workers = self.num_workers
        return torch.utils.data.DataLoader(dataset, num_workers=workers, persistent_workers=workers > 0, **kwargs)


def epoch_to_run(trainer: L.Trainer | None) -> int:
    """The epoch a Trainer's fit is about to run (restored from a resumed checkpoint); 0 outside a Trainer. Lightning
    gives samplers this very number (fit_loop.epoch_progress.current.processed)."""
    return trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed of (seed, epoch), well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
