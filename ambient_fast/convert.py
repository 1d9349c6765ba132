"""`python -m ambient_fast.convert RUN_DIR_OR_PKL OUT.safetensors`: convert a published reference
snapshot (an Ambient Diffusion run's, or NVlabs/edm2's) into our safetensors format once (safely:
nothing in the pickle is executed)."""
import argparse
import sys

from ambient_fast.files.checkpoints import load_network, save_network
from ambient_fast.files.atomic import check_writable_file


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ambient_fast.convert", description=__doc__)
    parser.add_argument("source", help="reference run directory (newest snapshot), network-snapshot-*.pkl, or an EDM2 .pkl")
    parser.add_argument("out", help="output .safetensors path")
    parser.add_argument("--training-options", help="training_options.json, if not beside the snapshot")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error(f"the output must be a .safetensors file, got {args.out!r}")
    try:
        check_writable_file(args.out, "the output")
        loaded = load_network(args.source, args.training_options)
        save_network(args.out, loaded.model, loaded.corruption, converted_from=loaded.source, **loaded.metadata)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    model = loaded.model
    if hasattr(model, "describe"):  # EDM2
        network = model.describe()
    else:
        network = f"{model.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, gate {model.gate}"
    print(f"converted {loaded.source} -> {args.out} ({network}, corruption {loaded.corruption})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
