"""`python -m ambient_fast.convert RUN_DIR_OR_PKL OUT.safetensors`: convert a published reference
snapshot (an Ambient Diffusion run's, or NVlabs/edm2's) into our safetensors format once (safely:
nothing in the pickle is executed)."""
import sys
from dataclasses import dataclass
from typing import Optional

from ambient_fast.options import INPUT, OUTPUT, Options, build_parser, option, overwrite_option, parse

EXAMPLES = (
    "python -m ambient_fast.convert published-run/ celeba.safetensors    # its newest snapshot",
    "python -m ambient_fast.convert network-snapshot-004000.pkl afhq.safetensors --training-options afhq-options.json",
)


@dataclass
class ConvertConfig(Options):
    """What `python -m ambient_fast.convert` reads and writes."""

    source: Optional[str] = option(None, "reference run directory (its newest snapshot), network-snapshot-*.pkl, or "
                                   "an EDM2 .pkl", positional=True, required=True, role=INPUT)
    out: Optional[str] = option(None, "the .safetensors file to write", positional=True, required=True, role=OUTPUT,
                                check=((lambda v: str(v).endswith(".safetensors")), "a .safetensors path"))
    training_options: Optional[str] = option(None, "training_options.json of a DDPM++ reference run", role=INPUT,
                                             default_text="the one beside the snapshot")
    overwrite: bool = overwrite_option("a checkpoint of ours")


def parser():
    return build_parser(ConvertConfig, prog="python -m ambient_fast.convert", description=__doc__, examples=EXAMPLES)


def main(argv=None) -> int:
    try:
        cfg = parse(ConvertConfig, parser(), argv)
        from ambient_fast.files.atomic import claim_output
        from ambient_fast.files.checkpoints import is_checkpoint, load_network, save_network

        claim_output(cfg.out, "the output", folder=False, what="an ambient-fast checkpoint", owned=is_checkpoint,
                     overwrite=cfg.overwrite, inputs=cfg.paths(INPUT))
        loaded = load_network(cfg.source, cfg.training_options)
        save_network(cfg.out, loaded.model, loaded.corruption, converted_from=loaded.source, **loaded.metadata)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    model = loaded.model
    if hasattr(model, "describe"):  # EDM2
        network = model.describe()
    else:
        network = f"{model.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, gate {model.gate}"
    print(f"converted {loaded.source} -> {cfg.out} ({network}, corruption {loaded.corruption})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
