"""`tpo-convert`: PyTorch checkpoints -> tpo-jax (Orbax) and back (`python -m tpo_jax.cli.convert`).

Subcommands `videochat`, `hf`, `llava_ov`, `sam2`, `export-hf`, `export-videochat`, `export-llava-ov`; see
docs/conversion.md. The work lives in
`tpo_jax.checkpoints.convert` and `tpo_jax.checkpoints.export`; the exports also take a `tpo-train` work
directory (its trained model: `tpo_jax.train.load.export_params`).
"""

from __future__ import annotations

import argparse
import os
import sys

from tpo_jax.checkpoints.convert import OUTPUT_DTYPES, convert_hf, convert_videochat, format_report, hf_llm_config
from tpo_jax.checkpoints.export import export_hf, export_videochat
from tpo_jax.checkpoints.orbax_io import DEFAULT_BUDGET_BYTES
from tpo_jax.cli.common import add_debug_flag, guarded
from tpo_jax.config import ConfigError, TPOConfig, get_config
from tpo_jax.overrides import apply_overrides


def _cli_config(args) -> TPOConfig:
    return apply_overrides(get_config(args.preset), args.set or [])


def _cli_mesh(spec: str | None):
    if not spec:
        return None
    from tpo_jax import sharding as tpo_sharding

    sizes = {}
    for part in spec.split(","):
        name, _, size = part.partition("=")
        if name.strip() not in ("data", "fsdp", "tensor") or not size.strip().lstrip("-").isdigit():
            raise ConfigError(f"--mesh {spec!r}: expected AXIS=SIZE pairs over data, fsdp, tensor, e.g. "
                              f"data=1,fsdp=-1,tensor=1")
        sizes[name.strip()] = int(size)
    return tpo_sharding.make_mesh(tpo_sharding.MeshConfig(**sizes))


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpo-convert", description="Convert PyTorch checkpoints to tpo-jax (Orbax) "
                                "and back. See docs/conversion.md.")
    add_debug_flag(p)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, lora_default, source_help="checkpoint file, index .json, or directory"):
        """The arguments every PyTorch → Orbax conversion takes (`--lora` where the source may carry LoRA)."""
        sp.add_argument("source", help=source_help)
        sp.add_argument("out", help="output directory (must not exist unless --overwrite)")
        if lora_default is not None:
            sp.add_argument("--lora", choices=["keep", "merge"], default=lora_default)
        sp.add_argument("--dtype", choices=list(OUTPUT_DTYPES), default="keep")
        sp.add_argument("--mesh", help="shard while writing, e.g. data=1,fsdp=-1,tensor=1")
        sp.add_argument("--rules", default="fsdp", help="sharding strategy of tpo_jax.sharding (with --mesh)")
        sp.add_argument("--budget-mb", type=int, default=DEFAULT_BUDGET_BYTES // 2 ** 20,
                        help="max MiB of tensors materialised at once (a larger tensor runs alone)")
        sp.add_argument("--overwrite", action="store_true")
        sp.add_argument("--dry-run", action="store_true", help="check and report, write nothing")

    v = sub.add_parser("videochat", help="released VideoChat-TPO checkpoint -> Orbax")
    common(v, "keep")
    v.add_argument("--preset", default="videochat_tpo_7b")
    v.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. llm.num_layers=4")
    v.add_argument("--no-extras", action="store_true", help="do not keep SAM2 / unused tensors")
    h = sub.add_parser("hf", help="Hugging Face Mistral/Llama (+ PEFT adapter) -> Orbax (under llm.)")
    common(h, "merge")
    h.add_argument("--adapter", help="PEFT adapter directory (adapter_config.json + weights)")
    h.add_argument("--config", help="config.json of the LLM (default: next to the weights)")
    h.add_argument("--scan-layers", action="store_true",
                   help="write the decoder layers stacked for a scanned model (llm.stack.scan_layers)")
    o = sub.add_parser("llava_ov", help="Hugging Face LLaVA-OneVision directory -> Orbax base weights (vision.*, "
                       "llm.*) of a TPO model of arch llava_ov")
    common(o, None, "checkpoint directory (config.json + safetensors, as save_pretrained writes it)")
    o.add_argument("--preset", default="llava_ov_tpo_7b", help="TPO model config whose base weights these are")
    o.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override, e.g. llm.stack.scan_layers=false")
    o.add_argument("--layout", default=None, help="key layout (transformers5, transformers4, release, saved5; "
                   "default: detected)")
    o.add_argument("--no-extras", action="store_true", help="do not keep SigLIP's unused post_layernorm")
    s = sub.add_parser("sam2", help="SAM2 v1 checkpoint (upstream .pt or transformers Sam2VideoModel directory) -> "
                       "Orbax params of tpo_jax.sam2.video.Sam2Video")
    s.add_argument("source", help="upstream checkpoint file (sam2_hiera_*.pt) or transformers directory")
    s.add_argument("out", help="output directory (must not exist unless --overwrite)")
    s.add_argument("--config", choices=["tiny", "sam2_hiera_l_v1"], default=None,
                   help="model preset (default: config.json of a transformers directory, else the preset whose "
                   "shapes fit)")
    s.add_argument("--dtype", choices=list(OUTPUT_DTYPES), default="keep")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--dry-run", action="store_true", help="check and report, write nothing")
    for name, what in (("export-hf", "our LLM -> Hugging Face safetensors (+ PEFT adapter with --peft)"),
                       ("export-videochat", "whole model -> VideoChat-TPO key layout"),
                       ("export-llava-ov", "base weights of a llava_ov model -> Hugging Face LLaVA-OneVision")):
        e = sub.add_parser(name, help=what)
        e.add_argument("checkpoint", help="a directory written by tpo-convert, or a tpo-train work directory")
        e.add_argument("out")
        e.add_argument("--stage", default=None, help="work directory: the stage whose checkpoint to export "
                       "(default: the last one present)")
        e.add_argument("--step", type=int, default=None, help="work directory: the checkpoint step (default: latest)")
        e.add_argument("--dtype", choices=list(OUTPUT_DTYPES), default="keep")
        e.add_argument("--max-shard-gb", type=float, default=5.0)
        e.add_argument("--overwrite", action="store_true")
        if name == "export-hf":
            e.add_argument("--peft", action="store_true", help="base weights + PEFT adapter instead of merged")
        if name == "export-llava-ov":
            e.add_argument("--layout", default=None, help="key layout to write (default: the source's, else saved5)")
    return p


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    return guarded("tpo-convert", lambda: _run(args), args.debug)


def _run(args) -> int:
    if args.command == "sam2":
        from tpo_jax.checkpoints.sam2_convert import convert_sam2  # noqa: PLC0415

        report = convert_sam2(args.source, args.out, config=args.config, dtype=args.dtype, overwrite=args.overwrite,
                              dry_run=args.dry_run, log=print)
        if args.dry_run:
            print(format_report(report))
        return 0
    if args.command == "llava_ov":
        from tpo_jax.checkpoints.llava_ov_convert import convert_llava_ov  # noqa: PLC0415

        report = convert_llava_ov(args.source, args.out, _cli_config(args), dtype=args.dtype,
                                  extras=not args.no_extras, layout=args.layout, mesh=_cli_mesh(args.mesh),
                                  rules=args.rules, overwrite=args.overwrite, budget_bytes=args.budget_mb * 2 ** 20,
                                  dry_run=args.dry_run, log=print)
        if args.dry_run:
            print(format_report(report))
        return 0
    if args.command in ("videochat", "hf"):
        common = dict(lora=args.lora, dtype=args.dtype, mesh=_cli_mesh(args.mesh), rules=args.rules,
                      overwrite=args.overwrite, budget_bytes=args.budget_mb * 2 ** 20, dry_run=args.dry_run,
                      log=print)
        if args.command == "videochat":
            report = convert_videochat(args.source, args.out, _cli_config(args), extras=not args.no_extras,
                                       **common)
        else:
            llm_cfg = hf_llm_config(args.config) if args.config else None
            report = convert_hf(args.source, args.out, adapter=args.adapter, llm_cfg=llm_cfg,
                                scan_layers=args.scan_layers or None, **common)
        if args.dry_run:
            print(format_report(report))
    else:
        kw = dict(dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1e9), overwrite=args.overwrite)
        checkpoint = args.checkpoint
        if not os.path.isfile(os.path.join(checkpoint, "conversion.json")) and \
                os.path.isfile(os.path.join(checkpoint, "config.json")):  # a tpo-train work directory
            from tpo_jax.train.load import export_params  # noqa: PLC0415
            checkpoint = export_params(checkpoint, stage=args.stage, step=args.step)
        if args.command == "export-hf":
            files = export_hf(checkpoint, args.out, peft=args.peft, **kw)
        elif args.command == "export-llava-ov":
            from tpo_jax.checkpoints.llava_ov_convert import export_llava_ov  # noqa: PLC0415
            files = export_llava_ov(checkpoint, args.out, layout=args.layout, **kw)
        else:
            files = export_videochat(checkpoint, args.out, **kw)
        print("\n".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
