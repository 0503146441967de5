"""``uge-protect eval``: train on protected and on clean shards, report accuracy on clean test shards."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from uge_protect.cli.common import one_error_line
from uge_protect.logs import configure



def eval_command(
    protected: Path = typer.Option(..., "--protected", help="Output directory of `uge-protect shard` (its shards/*.tar)."),
    clean_train: List[str] = typer.Option(..., "--clean-train", help="Clean training shards (pattern; repeatable)."),
    test: List[str] = typer.Option(..., "--test", help="Clean test shards (pattern; repeatable)."),
    output: Path = typer.Option(..., "--output", "-o", help="Report directory (report.json, report.md, PNG figures)."),
    task: str = typer.Option("classify", "--task", help="classify | clip | both."),
    arch: Optional[List[str]] = typer.Option(None, "--arch", help="Hacker architecture (repeatable): mlp, vit_tiny, small_cnn, resnet_cifar, vgg11, mobilenet_v2, resnet18, resnet18_cifar. Default: the first six."),
    defense: Optional[List[str]] = typer.Option(None, "--defense", help="Defense (repeatable): none, grayscale, jpeg:Q, cutout, mixup, strong-aug, adv-train. Default: none."),
    epochs: int = typer.Option(8, "--epochs", help="Training epochs per classifier."),
    batch_size: int = typer.Option(64, "--batch-size", help="Training batch size."),
    lr: float = typer.Option(3e-3, "--lr", help="Peak learning rate (one-cycle)."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="sgd (momentum, nesterov) | adamw."),
    no_flip: bool = typer.Option(False, "--no-flip", help="No random horizontal flips (for data where mirroring changes the label)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first repeat (repeat r uses seed + r)."),
    repeats: int = typer.Option(1, "--repeats", help="Repeats with different seeds (reports mean and spread)."),
    clean_fraction: float = typer.Option(0.0, "--clean-fraction", help="Fraction of protected training samples replaced by their clean versions (paired by key)."),
    adv_epsilon: float = typer.Option(8 / 255, "--adv-epsilon", help="PGD budget of the adv-train defense, in [0,1] units (default 8/255)."),
    adv_steps: int = typer.Option(3, "--adv-steps", help="PGD steps of the adv-train defense (step 2/255)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Centre-crop/resize all images to this size."),
    clip_epochs: Optional[int] = typer.Option(None, "--clip-epochs", help="CLIP training epochs (default: the CLIP evaluation's own)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N] (under a multi-process launch, each process takes its own device)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Directory of finished training runs to reuse (keyed by data bytes, settings, seed)."),
    authorized: Optional[Path] = typer.Option(None, "--authorized", help="A UGE artifact: also train its authorized network (architecture and key from the artifact), row ARCH+key."),
    other_key: Optional[List[int]] = typer.Option(None, "--other-key", help="With --authorized: also train the authorized architecture with this other key (repeatable), row ARCH+key:N."),
    distill: Optional[List[str]] = typer.Option(None, "--distill", help="With --authorized: also distill this architecture from the authorized network, on the same training set (repeatable)."),
    gate: bool = typer.Option(True, "--gate/--no-gate", help="With --authorized: the authorized network carries the artifact's confidence gate, when it has one (default); --no-gate: the bare network, to measure what the gate does."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Train models on the protected and on the clean shards; compare them on clean test shards."""
    configure(quiet=quiet)
    from uge_protect.eval.runner import DEFAULT_ARCHS, DEFAULT_DEFENSES, EvalConfig, run_evaluation

    cfg = EvalConfig(
        protected=str(protected), clean_train=list(clean_train), test=list(test), output=str(output), task=task,
        archs=list(arch) if arch else list(DEFAULT_ARCHS), defenses=list(defense) if defense else list(DEFAULT_DEFENSES),
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, flip=not no_flip, seed=seed,
        repeats=repeats, clean_fraction=clean_fraction, adv_epsilon=adv_epsilon, adv_steps=adv_steps,
        image_size=image_size, clip_epochs=clip_epochs, device=device, quiet=quiet,
        cache_dir=str(cache) if cache else None, authorized=str(authorized) if authorized else None,
        other_keys=list(other_key or []), distill=list(distill or []), gate=gate,
    )
    with one_error_line():
        report = run_evaluation(cfg)
    if not quiet:
        cls = report["tasks"].get("classify")
        if cls:
            for row in cls["summary"]:
                c = row["clean"]["final_test_acc"]["mean"]
                p = row["protected"]["final_test_acc"]["mean"]
                note = row["role"] + ("" if row["learned"] else ", did not learn")
                typer.echo(f"{row['defense']:>12} {row['arch']:<14} clean {100 * c:5.1f}%  protected {100 * p:5.1f}%"
                           f"  ({note})", err=True)
        typer.echo(f"wrote {output / 'report.json'}, {output / 'report.md'} and figures", err=True)
    from uge_protect.eval.protocol import headline_text

    typer.echo(headline_text(report))
