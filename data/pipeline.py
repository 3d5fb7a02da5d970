"""The data pipeline's entry points: `prepare` (tokenizer + shards, idempotent) and `build_loader`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

from slimtrain.core.transforms import TRANSFORMS, BatchTransform
from slimtrain.data.config import DataConfig
from slimtrain.data.errors import DataError
from slimtrain.data.dataset import TokenDataset
from slimtrain.data.bucket_epoch import BucketSpec
from slimtrain.data.bucket_loader import BUCKETS, BucketLoader
from slimtrain.data.loader import Loader, StreamSpec
from slimtrain.data.build import prepare_source, source_dir
from slimtrain.data.sources import DocumentSource, FilesDocumentSource, digest, open_source
from slimtrain.data.tokenizer import TokenizerInfo, check_tokenizer_path, load_tokenizer, train_bpe


@dataclass(frozen=True)
class PreparedData:
    """Prepared data: the tokenizer, the per-source manifests and the train/val datasets."""

    config: DataConfig
    tokenizer: TokenizerInfo
    manifest: dict
    train: TokenDataset
    val: TokenDataset
    directories: list[Path]


def _training_texts(sources: list[DocumentSource], max_bytes: int) -> Iterator[str]:
    """Texts for BPE training: every source gets its share of `max_bytes` (by weight, else equally)."""
    weights = [s.cfg.weight or 1.0 for s in sources]
    for src, w in zip(sources, weights):
        budget = max_bytes * w / sum(weights)
        used = 0
        for text in src.documents():
            if used >= budget:
                break
            used += len(text)
            yield text


def resolve_tokenizer(cfg: DataConfig, sources: list[DocumentSource], progress: bool = True) -> tuple[TokenizerInfo, str]:
    """(tokenizer, identity): the recipe's local tokenizer, or the BPE trained on its sources (trained once, cached)."""
    t = cfg.tokenizer
    if t.path is not None:
        info = load_tokenizer(t.path, cache_dir=cfg.cache_dir, eos_token=t.eos_token, add_bos=t.add_bos)
        return info, str(Path(t.path).expanduser().resolve())
    spec = t.train
    assert spec is not None  # guaranteed by TokenizerConfig validation
    key = digest([[(s.fingerprint(), s.cfg.max_documents, s.cfg.weight) for s in sources], spec.model_dump()])
    out = Path(cfg.cache_dir) / "tokenizers" / f"bpe-{spec.vocab_size}-{key[:12]}"
    if not (out / "tokenizer.json").exists():
        for src in sources:
            src.check()
        train_bpe(_training_texts(sources, spec.max_train_bytes), spec.vocab_size, out,
                  min_frequency=spec.min_frequency, progress=progress)
    info = load_tokenizer(out, cache_dir=cfg.cache_dir, eos_token=t.eos_token, add_bos=t.add_bos,
                          where="data.tokenizer.train")
    return info, str(out.resolve())


def check_inputs(cfg: DataConfig) -> None:
    """What can be checked of the inputs without reading them, before a run launches: every local source's paths
    match files and a local tokenizer exists (SourceError / TokenizerError naming the field)."""
    for index, source in enumerate(cfg.sources):
        src = open_source(source, index)
        if isinstance(src, FilesDocumentSource):
            src.files()
    if cfg.tokenizer.path is not None:
        check_tokenizer_path(Path(cfg.tokenizer.path).expanduser(), "data.tokenizer.path")


def prepare(cfg: DataConfig, progress: bool = True, rebuild: bool = False) -> PreparedData:
    """Train/load the tokenizer and write every source's shards if missing (idempotent; `rebuild` re-tokenizes)."""
    sources = [open_source(s, i) for i, s in enumerate(cfg.sources)]
    tok, identity = resolve_tokenizer(cfg, sources, progress)
    directories, manifests = [], []
    for src in sources:
        directory = source_dir(cfg, src, identity, tok.add_bos)
        manifests.append(prepare_source(cfg, src, tok, directory, progress=progress, rebuild=rebuild))
        directories.append(directory)
    pairs = list(zip(directories, manifests))
    manifest = {
        "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size, "dir": str(tok.tokenizer_dir)},
        "sources": [{"directory": str(d), **m} for d, m in pairs],
        "counts": {k: sum(m["counts"][k] for m in manifests) for k in manifests[0]["counts"]},
    }
    return PreparedData(cfg, tok, manifest, TokenDataset(pairs, "train"), TokenDataset(pairs, "val"), directories)


def build_loader(
    prepared: PreparedData, split: Literal["train", "val"], *, rank: int, world_size: int, micro_batch_size: int,
    global_batch_size: int, seed: int, prefetch: int = 2, transforms: Sequence[BatchTransform] = (),
) -> Loader:
    """This rank's loader over `split` (see `Loader` for the global stream it takes its share of);
    `transforms` add the plugins' batch fields (slimtrain.core.transforms)."""
    cfg = prepared.config
    _check_registered(transforms)
    weights = [s.weight for s in cfg.sources] if split == "train" and cfg.sources[0].weight is not None else None
    packer = cfg.packer if split == "train" else cfg.resolved_val_packer()
    buckets = _bucket_spec(cfg) if packer == BUCKETS else None
    spec = StreamSpec(
        dataset=prepared.train if split == "train" else prepared.val, packer=packer, seq_len=cfg.seq_len,
        weights=weights, seed=seed, buffer_docs=cfg.pack_buffer_docs, transforms=tuple(transforms), buckets=buckets,
    )
    loader_type = BucketLoader if buckets is not None else Loader  # rows of one length per step, varying by step
    return loader_type(spec, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                       global_batch_size=global_batch_size, pad_id=prepared.tokenizer.pad_id,
                       mask_cross_doc_labels=cfg.mask_cross_doc_labels, prefetch=prefetch)


def _bucket_spec(cfg: DataConfig) -> BucketSpec:
    b = cfg.buckets
    return BucketSpec(min_len=b.min_len, curriculum=b.curriculum, cycles=b.cycles, remainder=b.remainder,
                      weights=tuple(b.weights) if b.weights is not None else None)



def _check_registered(transforms: Sequence[BatchTransform]) -> None:
    """A transform's name stands for it in the loader state's fingerprint: it must be the registered one."""
    for transform in transforms:
        if transform.name not in TRANSFORMS or TRANSFORMS.get(transform.name) is not type(transform):
            raise DataError(f"batch transform {type(transform).__name__} is not the one registered as "
                            f"{transform.name!r}; register it with slimtrain.core.transforms.TRANSFORMS.register("
                            f"{transform.name!r}) (the name goes into resumable loader states)")
