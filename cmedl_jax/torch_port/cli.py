"""``cmedl-convert-torch``: a PyTorch checkpoint of a reference architecture -> flax variables.

    cmedl-convert-torch --arch {generator,discriminator,unet,densefcn} --in weights.pth --out DIR
        [--key K] [--prefix P] [architecture options]

Reads the file with ``torch.load(map_location="cpu", weights_only=True)``, finds the state_dict (also inside
``{"state_dict": ...}``-style wrappers, without DataParallel ``module.`` prefixes), checks every key and shape
against the architecture and writes ``DIR/variables.msgpack`` (``flax.serialization``) and ``DIR/arch.json`` (the
architecture and its options). Options not given are read off the checkpoint; given ones are checked against it.
Load the result with ``module, variables, meta = cmedl_jax.torch_port.load(DIR)``.
"""

from __future__ import annotations

import argparse
import os
import sys

from cmedl_jax.torch_port import convert


def _ints(text):
  try:
    return tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="cmedl-convert-torch", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", required=True, choices=convert.ARCHS)
  parser.add_argument("--in", dest="input", required=True, metavar="FILE", help="PyTorch checkpoint (.pth/.pt)")
  parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
  parser.add_argument("--key", help="dotted path of the state_dict inside the checkpoint (e.g. netG_A)")
  parser.add_argument("--prefix", help="keep only keys with this prefix and remove it (e.g. 'netG_A.')")
  arch = parser.add_argument_group("architecture options (default: read off the checkpoint)")
  arch.add_argument("--input-channels", "--input-nc", type=int, dest="input_channels")
  arch.add_argument("--output-channels", "--output-nc", type=int, dest="output_channels", help="generator")
  arch.add_argument("--base-features", "--ngf", "--ndf", type=int, dest="base_features",
                    help="generator ngf / discriminator ndf")
  arch.add_argument("--num-blocks", "--n-blocks", type=int, dest="num_blocks", help="generator residual blocks")
  arch.add_argument("--num-downsampling", type=int, dest="num_downsampling", help="generator")
  dropout = arch.add_mutually_exclusive_group()
  dropout.add_argument("--use-dropout", action="store_const", const=True, dest="use_dropout",
                       help="generator trained with --use_dropout (second block conv at conv_block.6)")
  dropout.add_argument("--no-dropout", action="store_const", const=False, dest="use_dropout")
  arch.add_argument("--num-layers", "--n-layers", type=int, dest="num_layers", help="discriminator n_layers")
  arch.add_argument("--num-classes", "--n-classes", type=int, dest="num_classes", help="segmenters")
  arch.add_argument("--features", type=_ints, help="U-Net encoder widths, e.g. 64,128,256,512,512")
  bias = arch.add_mutually_exclusive_group()
  bias.add_argument("--conv-bias", action="store_const", const=True, dest="conv_bias", help="U-Net")
  bias.add_argument("--no-conv-bias", action="store_const", const=False, dest="conv_bias", help="U-Net")
  arch.add_argument("--down-blocks", type=_ints, help="FC-DenseNet layers per down block, e.g. 5,5,5,5,5")
  arch.add_argument("--up-blocks", type=_ints, help="FC-DenseNet layers per up block")
  arch.add_argument("--bottleneck-layers", type=int, help="FC-DenseNet")
  arch.add_argument("--growth-rate", type=int, help="FC-DenseNet")
  arch.add_argument("--first-conv-features", "--out-chans-first-conv", type=int, dest="first_conv_features",
                    help="FC-DenseNet")
  return parser


_OPTION_NAMES = sorted({name for options in convert.DEFAULT_OPTIONS.values() for name in options})


def summary(conversion: convert.Conversion, source: str, paths) -> str:
  """Human-readable report of a conversion."""
  options = ", ".join(f"{k}={v}{' (read off the checkpoint)' if k in conversion.inferred else ''}"
                      for k, v in sorted(conversion.options.items()))
  stats = sum(v.size for v in _leaves(conversion.variables.get("batch_stats", {})))
  size_mb = os.path.getsize(paths["variables"]) / 1e6
  lines = [f"converted {conversion.arch} from {source}",
           f"  options: {options}",
           f"  tensors: {conversion.num_tensors} converted, {len(conversion.ignored)} ignored"
           + (f" ({', '.join(conversion.ignored[:5])}{', ...' if len(conversion.ignored) > 5 else ''})"
              if conversion.ignored else ""),
           f"  parameters: {conversion.num_parameters():,}; batch-norm statistics: {stats:,}",
           f"  wrote {paths['variables']} ({size_mb:.1f} MB) and {paths['arch']}",
           f"  load with: module, variables, meta = cmedl_jax.torch_port.load({os.path.dirname(paths['arch'])!r})"]
  return "\n".join(lines)


def _leaves(tree):
  for value in tree.values():
    yield from _leaves(value) if isinstance(value, dict) else [value]


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  options = {name: getattr(args, name) for name in _OPTION_NAMES if getattr(args, name, None) is not None}
  try:
    conversion = convert.convert_file(args.arch, args.input, options, key=args.key, prefix=args.prefix)
  except (convert.WeightImportError, ValueError, FileNotFoundError) as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  paths = convert.save(conversion, args.out, source=os.path.abspath(args.input))
  print(summary(conversion, args.input, paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())
