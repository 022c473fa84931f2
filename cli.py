"""The erftool command line (console script `erftool`, or `python -m cli`).

Each command validates its arguments, then calls into the erftool package; the work lives
in erftool.commands and erftool.plotting so it is testable without the CLI.
User mistakes become one "Error: ..." line on stderr and exit code 2.
"""
from __future__ import annotations

import json
import sys

import click

import erftool
from erftool.commands.common import USER_ERRORS, CliFailure, Console, user_message

RULES = ("signed", "abs", "relu", "square")
FORMATS = ("png", "pdf", "svg")


class _Group(click.Group):
    """Turns user errors raised anywhere below a command into CliFailure (exit 2)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as err:
            raise CliFailure(user_message(err)) from None


def _quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True,
                        help="No progress bars or messages; results only.")(f)


def _device_option(f):
    return click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
                        show_default=True, help="Where to run the networks.")(f)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=erftool.__version__, prog_name="erftool",
                      message="%(prog)s %(version)s")
def main():
    """Effective receptive fields of rigid, deformable-conv and deformable-kernel networks.

    \b
    Example:
      erftool compare                      # bundled models and data -> erf-out/
      erftool verify                       # the theory checks
    """


# ---------------------------------------------------------------- compare

@main.command()
@click.argument("checkpoints", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--images", type=click.Path(), help="Folder of images (all are used).")
@click.option("--synthetic", type=click.IntRange(min=1), metavar="N",
              help="Use N seeded synthetic images with known objects.")
@click.option("--layer", default=None, help="Probed layer (dotted module name); default: "
              "the model's last spatial feature map.")
@click.option("--position", default=None, metavar="Y,X",
              help="Probed unit on the layer's map; default: its centre.")
@click.option("--object-centres", is_flag=True,
              help="Probe each image at its objects' centres (synthetic data only).")
@click.option("--rule", type=click.Choice(RULES), default="abs", show_default=True,
              help="How gradients become an ERF map.")
@click.option("--arch", default=None, help="Architecture, for checkpoints that do not "
              "record it (see `erftool models`).")
@click.option("--out", default="erf-out", show_default=True, type=click.Path(),
              help="Output folder.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="png", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed for synthetic data.")
@_device_option
@_quiet_option
def compare(checkpoints, images, synthetic, layer, position, object_centres, rule, arch, out,
            fmt, seed, device, quiet):
    """Compare the ERFs of several checkpoints on the same inputs.

    Writes heatmap grids (shared and per-model colour scales), radial/cumulative mass
    profiles, metrics (terminal, JSON, CSV), each ERF as .npz and RepLKNet-style .npy,
    and a self-contained report.html.

    \b
    Examples:
      erftool compare                                 # bundled checkpoints and data
      erftool compare a.pt b.pt --images photos/ --out cmp --rule relu
      erftool compare --synthetic 32 --object-centres --layer layer2
    """
    from erftool.commands.compare import CompareRequest, run_compare
    if images and synthetic:
        raise CliFailure("give either --images or --synthetic, not both")
    if position and object_centres:
        raise CliFailure("give either --position or --object-centres, not both")
    req = CompareRequest(checkpoints=list(checkpoints), images=images, synthetic=synthetic,
                         layer=layer, position=position, object_centres=object_centres,
                         rule=rule, arch=arch, out=out, fmt=fmt, seed=seed, device=device,
                         command=_command_line())
    run_compare(req, Console(quiet))


# ---------------------------------------------------------------- heatmap

@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--image", "image", default=None, type=click.Path(),
              help="Image file, or 'synthetic[:SEED]' for a generated image with objects; "
                   "default: the sample photo shipped with matplotlib.")
@click.option("--layer", default=None, help="Probed layer; default: last spatial map.")
@click.option("--position", default=None, metavar="Y,X", help="Probed unit on the layer's map.")
@click.option("--rule", type=click.Choice(RULES), default="abs", show_default=True)
@click.option("--arch", default=None, help="Architecture, if the checkpoint lacks it.")
@click.option("--out", default="erf-heatmap.png", show_default=True, type=click.Path(),
              help="Output figure (extension set by --format).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="png", show_default=True)
@_device_option
@_quiet_option
def heatmap(checkpoint, image, layer, position, rule, arch, out, fmt, device, quiet):
    """ERF of one image overlaid on it, with the theoretical RF outlined.

    For a synthetic image, the ERF is taken at each object's centre.

    \b
    Examples:
      erftool heatmap model.pt --image cat.png --position 4,4 --out cat-erf.png
      erftool heatmap model.pt --image synthetic:3
    """
    from erftool.commands.heatmap import run_heatmap
    path = run_heatmap(checkpoint=checkpoint, image=image, layer=layer, position=position,
                       rule=rule, arch=arch, out=out, fmt=fmt, device=device,
                       console=Console(quiet))
    click.echo(str(path))


# ---------------------------------------------------------------- verify

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--quick", is_flag=True, help="Fewer configurations per check (seconds).")
@click.option("--backend", type=click.Choice(["reference", "native", "auto"]), default=None,
              help="Operator backend for the deformable layers (default: the suite's).")
@_quiet_option
def verify(as_json, quick, backend, quiet):
    """Run the theory checks (exact ERF formulas for linear networks).

    Prints check, formula, max error, tolerance and verdict; exits 1 if any fails.

    \b
    Example:
      erftool verify --quick
      erftool verify --json > verify.json
    """
    from erftool.commands.verify import format_table, run_checks
    rows = run_checks(Console(quiet), quick=quick, backend=backend)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(format_table(rows))
    failed = [r for r in rows if not r["passed"]]
    if failed:
        click.echo(f"{len(failed)} of {len(rows)} checks failed", err=True)
        sys.exit(1)


# ---------------------------------------------------------------- figures

@main.command()
@click.option("--out", default="figures", show_default=True, type=click.Path(),
              help="Output folder.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="png", show_default=True)
@click.option("--only", multiple=True, metavar="NAME",
              help="Regenerate only these figures (repeatable); see the list below.")
@click.option("--bench-json", default=None, type=click.Path(),
              help="Benchmark results for the speed figure; default: "
                   "benchmarks/results/*.json.")
@click.option("--seed", default=0, show_default=True)
@_quiet_option
def figures(out, fmt, only, bench_json, seed, quiet):
    """Regenerate every figure the README shows, deterministically.

    Figures: erf_comparison, kernel_sampling, erf_vs_scale, erf_growth, op_speed.

    \b
    Example:
      erftool figures --out figures/ --only erf_growth
    """
    from erftool.commands.figures import FIGURES, run_figures
    unknown = [n for n in only if n not in FIGURES]
    if unknown:
        raise CliFailure(f"unknown figure {unknown[0]!r}; choose from {', '.join(FIGURES)}")
    written = run_figures(out=out, fmt=fmt, only=list(only) or list(FIGURES),
                          bench_json=bench_json, seed=seed, console=Console(quiet),
                          skip_missing=not only)
    for p in written:
        click.echo(str(p))


# ---------------------------------------------------------------- train / bench / doctor / models

@main.command()
@click.argument("arch")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint path.")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help="Epochs in total (default: the trainer's).")
@click.option("--seed", default=0, show_default=True)
@click.option("--train-size", default=None, type=click.IntRange(min=1),
              help="Training images per epoch (default: the trainer's).")
@click.option("--val-size", default=None, type=click.IntRange(min=1),
              help="Validation images (default: the trainer's).")
@click.option("--resume", is_flag=True, help="Continue from --out if it exists.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@_device_option
@_quiet_option
def train(arch, out, epochs, seed, train_size, val_size, resume, overwrite, device, quiet):
    """Train a zoo model (see `erftool models`) on the synthetic dataset.

    \b
    Example:
      erftool train resnet-tiny-dk-local --out dk.pt --epochs 6
    """
    from erftool.commands.train import run_train
    path = run_train(arch=arch, out=out, epochs=epochs, seed=seed, device=device,
                     console=Console(quiet), resume=resume, overwrite=overwrite,
                     train_size=train_size, val_size=val_size)
    click.echo(str(path))


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def bench(bench_args):
    """Run the operator benchmark (benchmarks/bench_ops.py); extra arguments pass through.

    \b
    Example:
      erftool bench --help
    """
    from erftool.commands.figures import run_bench
    sys.exit(run_bench(list(bench_args)))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def doctor(as_json):
    """Show which operator backend is active and why.

    \b
    Example:
      ERFTOOL_BACKEND=reference erftool doctor
    """
    from erftool.commands.verify import doctor_info
    info = doctor_info()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            click.echo(f"{k:<{width}}  {v}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def models(as_json):
    """List the model zoo.

    \b
    Example:
      erftool models
    """
    from erftool.commands.verify import zoo_rows
    rows = zoo_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        click.echo(f"{r['name']:<{width}}  {r.get('description', '')}")


def _command_line() -> str:
    import shlex
    argv = list(sys.argv)
    argv[0] = "erftool"
    return " ".join(shlex.quote(a) for a in argv)


if __name__ == "__main__":
    main(prog_name="erftool")
