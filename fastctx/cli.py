"""The `fastctx` command: train, eval, predict, compare, bench.

    fastctx train apcnet_r18-d8_synthetic [--work-dir DIR] [--resume [CKPT]] [--set train.iters=200 ...]
    fastctx eval CONFIG --checkpoint CKPT [--mode whole|slide] [--tta] [--set ...]
    fastctx predict CONFIG --checkpoint CKPT IMAGE... --out DIR [--mode whole|slide] [--tta] [--set ...]
    fastctx compare CONFIG CONFIG ... [--work-dir DIR] [--set ...]
    fastctx bench ...            (fastctx.benchmark; see `fastctx bench --help`)

CONFIG is a shipped config name (`fastctx train --list` shows them) or a YAML
path. Multi-process training: `torchrun --nproc_per_node=N -m fastctx.cli train CONFIG`.
`--set key=value` merges into the config, `--set key:=value` replaces (see
fastctx.engine.config). Errors the user causes -- bad configs, keys and
values, a backend that cannot run here, missing, corrupt or mislabelled data
files, corrupt checkpoints, a work directory that cannot be written or a full
disk -- exit with status 2 and one line saying what is wrong.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
# File-system errors a user causes (a path they gave is unwritable, full, or not what it should be).
_USER_FILE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                     errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG}


class CommandError(Exception):
    """A user error the CLI reports in one line and exits 2 for."""


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="override config keys, e.g. --set train.iters=200 optim.lr=0.01 data.crop_size=[32,32]; "
                             "KEY:=VALUE replaces a mapping instead of merging into it")


def _add_inference(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("whole", "slide"), help="inference mode (default: the config's eval.mode)")
    parser.add_argument("--tta", action="store_true", help="multi-scale + flip test-time augmentation "
                                                           "(eval.tta_scales, eval.tta_flip)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastctx", description="Train, evaluate and run fastctx segmentors.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Multi-process: torchrun --nproc_per_node=N -m fastctx.cli train CONFIG")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,predict,compare,bench}")
    sub.required = True

    p = sub.add_parser("train", help="train a config")
    p.add_argument("config", nargs="?", help="shipped config name or YAML path")
    p.add_argument("--work-dir", help="logs and checkpoints (default: runtime.work_dir or work_dirs/<config>)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue from CKPT, or from <work-dir>/latest.pth when no path is given")
    p.add_argument("--list", action="store_true", help="list the shipped configs and exit")
    _add_set(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the config's validation set")
    p.add_argument("config")
    p.add_argument("--checkpoint", required=True, help="a fastctx or mmseg checkpoint (.pth)")
    p.add_argument("--json", dest="json_out", metavar="PATH", help="also write the metrics as JSON here")
    _add_inference(p)
    _add_set(p)

    p = sub.add_parser("predict", help="write colour-coded class masks (PNG) for images")
    p.add_argument("config")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder: <out>/<image stem>.png")
    _add_inference(p)
    _add_set(p)

    p = sub.add_parser("compare", help="train and evaluate several configs the same way; one table, one plot")
    p.add_argument("configs", nargs="+", metavar="CONFIG")
    p.add_argument("--work-dir", default="work_dirs/compare", help="one sub-folder per config, plus the "
                                                                   "table (compare.json) and plot (compare.png)")
    _add_set(p)

    sub.add_parser("bench", help="benchmarks of the fused ops (fastctx.benchmark)", add_help=False)
    return parser


# ---------------------------------------------------------------------------------------------- commands


def _load(config: str, overrides: list[str]):
    from .engine.config import load_config

    return load_config(config, overrides)


def _cmd_train(args) -> int:
    from .engine import Trainer, available_configs, format_metrics_table

    if args.list:
        print("\n".join(available_configs()))
        return 0
    if not args.config:
        raise CommandError("train: a CONFIG is required (a shipped name or a YAML path; --list shows them)")
    cfg = _load(args.config, args.overrides)
    trainer = Trainer(cfg, args.work_dir, resume=args.resume)
    result = trainer.fit()
    if trainer.dist.is_main:
        if result.metrics is not None:
            print(format_metrics_table(result.metrics, title=f"{cfg.name}: validation at iteration {result.iters}"))
        print(f"{cfg.name}: {result.iters} iterations, {result.wall_time:.1f} s, {result.imgs_per_s:.1f} img/s; "
              f"checkpoint {result.checkpoint}; log {result.log_path}")
    return 0


def _inference_config(args):
    """The config with --mode / --tta applied; no backbone init file (the checkpoint holds all weights)."""
    flags = [f"eval.mode={args.mode}"] if args.mode else []
    flags += ["eval.tta=true"] if args.tta else []
    return _load(args.config, [*args.overrides, *flags, "model.pretrained=null"])


def _cmd_eval(args) -> int:
    from . import use_backend
    from .engine import (build_datasets, build_model_from_config, check_backend, eval_window, evaluate,
                         format_metrics_table, init_distributed, load_checkpoint, load_weights)

    cfg = _inference_config(args)
    dist_info = init_distributed(cfg.runtime.device, cfg.runtime.dist_backend)
    check_backend(cfg, dist_info.device)
    state = load_checkpoint(args.checkpoint)
    _, val_set = build_datasets(cfg, train=False, val=True)
    model = build_model_from_config(cfg, val_set.num_classes)
    load_weights(model, state)
    model.to(dist_info.device)
    crop, stride = eval_window(cfg)
    e = cfg.eval
    with use_backend(cfg.runtime.backend):
        metrics = evaluate(model, val_set, mode=e.mode, crop_size=crop, stride=stride, tta=e.tta,
                           tta_scales=e.tta_scales, tta_flip=e.tta_flip, device=dist_info.device,
                           amp=cfg.runtime.amp, dist_info=dist_info, num_workers=cfg.data.num_workers)
    if dist_info.is_main:
        mode = e.mode + (" + TTA" if e.tta else "")
        print(format_metrics_table(metrics, title=f"{cfg.name} ({args.checkpoint}, {mode})"))
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(metrics.to_dict(), indent=2) + "\n")
    return 0


def _dataset_meta(cfg, state: dict) -> tuple[list[str], list[list[int]]]:
    """Class names and palette: the checkpoint's (fastctx checkpoints record them), else the dataset's."""
    meta = state.get("meta") or {}
    classes, palette = list(meta.get("classes") or []), [list(c) for c in meta.get("palette") or []]
    if not classes:
        from .data import DATASETS

        cls = DATASETS[cfg.data.name].cls
        classes, palette = list(cls.classes), [list(c) for c in cls.palette]
    return classes, palette


def _cmd_predict(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from . import use_backend
    from .data import DATASETS, Normalize, load_image, test_pipeline
    from .engine import (build_model_from_config, check_backend, eval_window, load_checkpoint, load_weights,
                         predict_classes)
    from .engine.distributed import resolve_device

    cfg = _inference_config(args)
    device = resolve_device(cfg.runtime.device)
    check_backend(cfg, device)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise CommandError(f"predict: image file(s) not found: {', '.join(missing)}")
    state = load_checkpoint(args.checkpoint)
    classes, palette = _dataset_meta(cfg, state)
    if len(palette) < len(classes):
        raise CommandError(f"predict: the palette has {len(palette)} colours for {len(classes)} classes")
    if len(classes) > 256:
        raise CommandError(f"predict: paletted PNGs hold at most 256 classes, the model has {len(classes)}")
    model = build_model_from_config(cfg, len(classes))
    load_weights(model, state)
    model.to(device).eval()
    info = DATASETS[cfg.data.name]
    # The evaluation transform: file datasets resize to their test scale (keep ratio), synthetic scenes do not.
    transform = test_pipeline(cfg.data.scale or info.test_scale) if cfg.data.scale or info.needs_root \
        else Normalize()
    crop, stride = eval_window(cfg)
    e = cfg.eval
    flat_palette = [v for colour in palette[:len(classes)] for v in colour]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)  # the test transforms draw nothing; the pipeline API takes an rng
    with torch.no_grad(), use_backend(cfg.runtime.backend):
        for path in args.images:
            image = load_image(path)
            sample = transform({"img": image, "label": None}, rng)
            img = torch.from_numpy(np.ascontiguousarray(sample["img"].transpose(2, 0, 1), dtype=np.float32))
            pred = predict_classes(model, img[None].to(device), image.shape[:2], mode=e.mode, crop_size=crop,
                                   stride=stride, tta=e.tta, tta_scales=e.tta_scales, tta_flip=e.tta_flip,
                                   align_corners=bool(getattr(model, "align_corners", False)))[0]
            mask = Image.fromarray(pred.cpu().numpy().astype(np.uint8), mode="P")
            mask.putpalette(flat_palette)
            target = out_dir / f"{Path(path).stem}.png"
            mask.save(target)
            print(f"{path} -> {target}")
    return 0


def _format_table(rows: list[dict]) -> str:
    headers = ["config", "mIoU", "aAcc", "mAcc", "wall time (s)", "img/s"]
    cells = [[r["config"], f"{r['mIoU']:.2f}", f"{r['aAcc']:.2f}", f"{r['mAcc']:.2f}", f"{r['wall_time']:.1f}",
              f"{r['imgs_per_s']:.1f}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values):
        return "| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                 for i, (v, w) in enumerate(zip(values, widths))) + " |"

    rule = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    return "\n".join([rule, line(headers), rule, *(line(c) for c in cells), rule])


def _cmd_compare(args) -> int:
    from .engine import Trainer
    from .engine.logging import json_safe, read_json_lines
    from .engine.plot import plot_runs

    configs = [_load(c, args.overrides) for c in args.configs]  # all validated before any training starts
    base = Path(args.work_dir)
    rows, runs, names = [], {}, set()
    for cfg in configs:
        name, n = cfg.name, 2
        while name in names:  # the same config twice: separate runs
            name, n = f"{cfg.name}-{n}", n + 1
        names.add(name)
        trainer = Trainer(cfg, base / name)
        result = trainer.fit()
        metrics = result.metrics if result.metrics is not None else trainer.validate()
        if not trainer.dist.is_main:
            continue
        rows.append({"config": name, **metrics.summary(), "wall_time": result.wall_time,
                     "train_time": result.train_time, "imgs_per_s": result.imgs_per_s, "iters": result.iters,
                     "checkpoint": str(result.checkpoint), "work_dir": str(result.work_dir),
                     "per_class_iou": dict(zip(metrics.class_names, metrics.iou))})
        runs[name] = read_json_lines(result.log_path)
    if not rows:
        return 0
    print(_format_table(rows))
    plot = plot_runs(runs, base / "compare.png", title="fastctx compare")
    summary = base / "compare.json"
    summary.write_text(json.dumps(json_safe({"runs": rows, "overrides": args.overrides}), indent=2) + "\n")
    print(f"plot: {plot}\nsummary: {summary}")
    return 0


def _cmd_bench(argv: list[str]) -> int:
    import importlib

    try:
        benchmark = importlib.import_module("fastctx.benchmark")
    except ImportError as exc:
        raise CommandError(f"bench: the benchmark suite fastctx.benchmark cannot be imported ({exc})") from None
    bench_main = getattr(benchmark, "main", None)
    if bench_main is None:
        raise CommandError("bench: fastctx.benchmark has no main(argv) in this build (the benchmark suite is "
                           "not installed or incomplete)")
    return int(bench_main(argv) or 0)


# ---------------------------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `fastctx` command with `argv` (default sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .data import DatasetError
    from .engine.checkpoint import CheckpointError, WorkDirError
    from .engine.config import ConfigError

    try:
        if argv and argv[0] == "bench":
            return _cmd_bench(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
            return int(exc.code or 0)
        command = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "compare": _cmd_compare}
        return command[args.command](args)
    except (ConfigError, CheckpointError, CommandError, DatasetError, WorkDirError, FileNotFoundError) as exc:
        print(f"fastctx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno not in _USER_FILE_ERRNOS or exc.filename is None:
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"fastctx: error: no space left on device while writing {exc.filename}", file=sys.stderr)
        else:
            print(f"fastctx: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fastctx: interrupted", file=sys.stderr)
        return 130
    finally:
        from .engine.distributed import cleanup_distributed

        cleanup_distributed()  # a torchrun launch leaves its process group cleanly


if __name__ == "__main__":
    sys.exit(main())
