"""The settings of one evaluation: each a field with its help, default and bounds, from which
``uge-protect eval``'s options are built (:mod:`uge_protect.cli.options`)."""

from __future__ import annotations

from dataclasses import dataclass

from uge_protect.errors import UserError
from uge_protect.eval.authorized import ModelEntry, authorized_entries
from uge_protect.eval.defenses import Defense, parse_defense
from uge_protect.models.classifiers import ARCHITECTURES
from uge_protect.options import check_options, option

#: Hacker architectures of different inductive biases, each learning clean data in 8 CPU epochs.
DEFAULT_ARCHS = ("mlp", "vit_tiny", "small_cnn", "resnet_cifar", "vgg11", "mobilenet_v2")
DEFAULT_DEFENSES = ("none",)
TASKS = ("classify", "clip", "both")
_DEFENSE_LIST = "none, grayscale, jpeg:Q, class-mean, cutout, mixup, strong-aug, adv-train"


@dataclass
class EvalConfig:
    """Settings of one evaluation (all recorded in report.json)."""

    protected: str = option(flag="--protected", required=True, help="Output directory of `uge-protect shard` (its shards/*.tar).")
    clean_train: list[str] = option(flag="--clean-train", repeatable=True, required=True,
                                    help="Clean training shards (pattern; repeatable).")
    test: list[str] = option(flag="--test", repeatable=True, required=True, help="Clean test shards (pattern; repeatable).")
    output: str = option(flag="--output", short="-o", required=True, help="Report directory (report.json, report.md, PNG figures).")
    task: str = option("classify", choices=TASKS, label="task", help="classify | clip | both.")
    archs: list[str] = option(
        factory=lambda: list(DEFAULT_ARCHS), flag="--arch", repeatable=True, default_help="the first six",
        help=f"Hacker architecture (repeatable): {', '.join(ARCHITECTURES)}.")
    defenses: list[str] = option(factory=lambda: list(DEFAULT_DEFENSES), flag="--defense", repeatable=True,
                                 help=f"Defense (repeatable): {_DEFENSE_LIST}.")
    epochs: int = option(8, min=1, label="--epochs", help="Training epochs per classifier.")
    # AdamW at 3e-3, batch 64: small_cnn learns the demo data in 8 CPU epochs, where SGD at
    # 0.05, batch 128 did far worse (docs/eval.md).
    batch_size: int = option(64, min=1, label="--batch-size", help="Training batch size.")
    optimizer: str = option("adamw", choices=("sgd", "adamw"), label="optimizer",
                            help="sgd (momentum, nesterov) | adamw.")
    lr: float = option(3e-3, min=0.0, min_open=True, label="--lr", help="Peak learning rate (one-cycle).")
    weight_decay: float = option(5e-4, cli=False, help="Weight decay of the optimizer.")
    schedule: str = option("onecycle", cli=False, help="Learning-rate schedule.")
    flip: bool = option(True, help="Random horizontal flips (--no-flip for data where mirroring changes the label).")
    crop_padding: int = option(4, cli=False, help="Padding of the random crop, in pixels.")
    seed: int = option(0, help="Seed of the first repeat (repeat r uses seed + r).")
    repeats: int = option(1, min=1, label="--repeats", help="Repeats with different seeds (reports mean and spread).")
    clean_fraction: float = option(0.0, min=0.0, max=1.0, label="--clean-fraction", help=(
        "Fraction of protected training samples replaced by their clean versions (paired by key)."))
    adv_epsilon: float = option(8 / 255, min=0.0, max=1.0, label="--adv-epsilon",
                                reason=" (image units, e.g. 0.0314 for 8/255)",
                                help="PGD budget of the adv-train defense, in [0,1] units.")
    adv_step: float = option(2 / 255, cli=False, help="PGD step of the adv-train defense.")
    adv_steps: int = option(3, min=1, label="--adv-steps", help="PGD steps of the adv-train defense (step 2/255).")
    image_size: int | None = option(None, min=8, label="--image-size", default_help="as stored",
                                    help="Centre-crop/resize all images to this size.")
    clip_epochs: int | None = option(None, min=1, label="--clip-epochs", default_help="the CLIP evaluation's own",
                                     help="CLIP training epochs.")
    clip_model_config: str | None = option(None, cli=False, help="open_clip model config of the CLIP run.")
    device: str = option("auto", help=(
        "auto | cpu | cuda[:N] (under a multi-process launch, each process takes its own device)."))
    #: Directory of finished runs to reuse (see :mod:`uge_protect.eval.cache`); None: off.
    cache_dir: str | None = option(None, flag="--cache", default_help="off", help=(
        "Directory of finished training runs to reuse (keyed by data bytes, settings, seed)."))
    authorized: str | None = option(None, default_help="none", help=(
        "A UGE artifact: also train its authorized network (architecture and key from the artifact), row ARCH+key."))
    other_keys: list[int] = option(factory=list, flag="--other-key", repeatable=True, default_help="none", help=(
        "With --authorized: also train the authorized architecture with this other key (repeatable), row ARCH+key:N."))
    distill: list[str] = option(factory=list, repeatable=True, default_help="none", help=(
        "With --authorized: also distill this architecture from the authorized network, on the same training set "
        "(repeatable)."))
    gate: bool = option(True, help=(
        "With --authorized: the authorized network carries the artifact's confidence gate, when it has one; "
        "--no-gate: the bare network, to measure what the gate does."))
    method_aware: bool = option(False, flag="--method-aware", help=(
        "Also train an attacker who knows the protection's method but not its artifact, for every --arch "
        "(what it tries comes from the method: for UGE every key direction, one estimated from the data, "
        "and the average over all); rows ARCH@STRATEGY."))
    attacker_fraction: float = option(0.01, min=0.0, max=1.0, min_open=True, label="--attacker-fraction", help=(
        "With --method-aware: the attacker's clean labelled set, as a fraction of the clean training set "
        "(it keeps the enumerated key that scores best there)."))
    #: Log no progress (library use; the command leaves this to its logging's --quiet).
    quiet: bool = option(False, cli=False, help="Log no progress.")
    figures: bool = option(True, cli=False, help="Draw the PNG figures.")

    def validate(self) -> list[Defense]:
        """Check the settings; the parsed defenses."""
        check_options(self)
        if not self.archs and not self.authorized:
            raise UserError("give at least one --arch")
        for a in self.archs:
            if a not in ARCHITECTURES:
                raise UserError(f"unknown architecture {a!r}; choose {', '.join(ARCHITECTURES)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise UserError("--device must be auto, cpu or cuda[:N]")
        defenses = [parse_defense(d) for d in (self.defenses or ["none"])]
        specs = [d.spec for d in defenses]
        if len(set(specs)) != len(specs):
            raise UserError(f"a defense is given twice: {' '.join(specs)}")
        return defenses

    def models(self) -> list[ModelEntry]:
        """Every classifier row: the plain architectures, then the ``--authorized`` ones."""
        return [ModelEntry(a, a) for a in self.archs] + authorized_entries(self.authorized, self.other_keys,
                                                                         self.distill, self.gate)
