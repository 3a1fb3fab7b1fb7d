"""The training loop shared by every stage: batches, AMP, schedule, logs, checkpoints, resume.

An output folder holds ``log.jsonl`` (one line per logged step), ``checkpoint-NNNNNN/`` folders
(the model in its own checkpoint format + ``trainer_state.pt``: optimiser, schedule, step, RNG)
and, when the run ends, ``final/``. ``resume=True`` continues from the newest checkpoint. With
``ema_decay`` the saved models hold the weights' moving average and ``trainer_state.pt`` the live
weights that training continues from.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_device
from ..errors import ConfigError
from ..teachers.loading import load_teacher, teacher_name
from .cache import cached_inputs, teacher_outputs
from .config import TrainConfig
from .ema import WeightAverage
from .pairs import PairSet
from .stages import Stage, build_stage

STATE_NAME, LOG_NAME, FINAL_NAME = "trainer_state.pt", "log.jsonl", "final"


def lr_factor(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``lr_min`` as progress → 1."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    floor = config.lr_min / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def checkpoints(output: Path) -> list[Path]:
    return sorted(p for p in output.glob("checkpoint-*") if (p / STATE_NAME).is_file())


class Trainer:
    def __init__(self, config: TrainConfig, progress: bool | None = None) -> None:
        self.config = config
        self.output = Path(config.output)
        self.device = resolve_device(config.device)
        self.progress = progress
        self.pair_sets = [PairSet.load(folder) for folder in config.pair_folders()]
        if any(p.spec.scale != 4 for p in self.pair_sets):
            raise ConfigError("training supports x4 pairs")
        if len({p.lr.shape[1:] for p in self.pair_sets}) > 1:
            raise ConfigError("pairs folders to train together need one pair size")
        torch.manual_seed(config.seed)  # the same config starts from the same weights
        self.stage: Stage = build_stage(config)
        # A run that continues a stage (from a checkpoint of the same stage) adds its own record.
        self.record_key, n = f"trained_{config.stage}", 2
        while self.record_key in self.stage.provenance():
            self.record_key, n = f"trained_{config.stage}_{n}", n + 1
        self.stage.model.to(self.device)
        # Everything a batch needs, once on the training device (uint8: 2000 pairs ≈ 1.2 GB with both
        # teachers); each folder keeps its own caches, so adding a folder recomputes nothing.
        # ``pair_set``: which folder each pair came from (per-folder settings such as ``alpha_ends``).
        parts = [
            {**self._pair_data(pairs), "pair_set": torch.full((len(pairs),), i, dtype=torch.int64)}
            for i, pairs in enumerate(self.pair_sets)
        ]
        self.data = {k: torch.cat([part[k] for part in parts]).to(self.device) for k in parts[0]}
        self.gen = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.elapsed = 0.0  # training seconds so far (carried across resumes)
        self.average: WeightAverage | None = None
        self.trained: dict[str, torch.nn.Parameter] = {}

    def _progress(self) -> float:
        c = self.config
        by_time = self.elapsed / c.max_seconds if c.max_seconds else 0.0
        return max(self.step / c.steps, by_time)

    # -- data --------------------------------------------------------------------------------
    def _pair_data(self, pairs: PairSet) -> dict[str, torch.Tensor]:
        return {"lr": pairs.lr, "hr": pairs.hr, **self._teacher_targets(pairs), **self._cached_inputs(pairs)}

    def _teacher_targets(self, pairs: PairSet) -> dict[str, torch.Tensor]:
        from tqdm import tqdm

        out = {}
        for key, attr in self.stage.teachers.items():
            spec = getattr(self.config, attr)
            name = teacher_name(spec)
            quiet = self.progress is False
            with tqdm(total=len(pairs), desc=f"teacher {name}", unit="pair", disable=quiet) as bar:
                out[key] = teacher_outputs(
                    pairs, name, partial(load_teacher, spec, self.device), self.device,
                    self.config.teacher_batch, bar.update,
                )  # fmt: skip
        return out

    def _cached_inputs(self, pairs: PairSet) -> dict[str, torch.Tensor]:
        from tqdm import tqdm

        self.stage.model.eval()
        out: dict[str, torch.Tensor] = {}
        for key, compute in self.stage.input_cache():
            with tqdm(total=len(pairs), desc=key, unit="pair", disable=self.progress is False) as bar:
                out = cached_inputs(pairs, key, compute, out, self.device, self.config.teacher_batch, bar.update)
        return {f"in_{name}": value for name, value in out.items()}

    def batch(self) -> dict[str, torch.Tensor]:
        """A random batch of pairs, the same random LR crop (and matching SR crop) for each."""
        c, n = self.config, len(self.data["lr"])
        idx = torch.randint(n, (c.batch_size,), generator=self.gen).to(self.device)
        h = self.data["lr"].shape[-1]
        crop = min(c.crop or h, h)
        top, left = (int(v) for v in torch.randint(h - crop + 1, (2,), generator=self.gen))
        s = self.pair_sets[0].spec.scale
        lr_win = (slice(None), slice(None), slice(top, top + crop), slice(left, left + crop))
        sr_win = (slice(None), slice(None), slice(top * s, (top + crop) * s), slice(left * s, (left + crop) * s))
        out = {}
        for k, v in self.data.items():
            if v.dim() == 1:  # per-pair labels
                out[k] = v[idx]
                continue
            window = v[idx][lr_win if v.shape[-1] == h else sr_win]  # LR-sized tensors take the LR window
            out[k] = window.float().div_(255) if v.dtype == torch.uint8 else window.float()
        return out

    # -- loop --------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        use = self.config.amp == "bf16" or (self.config.amp == "auto" and self.device.type == "cuda")
        if not use:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train(self, resume: bool = False) -> Path:
        from tqdm import tqdm

        c = self.config
        model = self.stage.model
        model.requires_grad_(False)
        params = self.stage.parameters()
        if not params:
            raise ConfigError(f"{c.stage}: nothing to train")
        for p in params:
            p.requires_grad_(True)
        model.train()
        by_id = {id(p): n for n, p in model.named_parameters()}
        self.trained = {by_id[id(p)]: p for p in params}  # what checkpoints record (and a resume checks)
        if c.ema_decay is not None:
            self.average = WeightAverage(self.trained, c.ema_decay)
        optim = torch.optim.Adam(params, lr=c.lr, betas=(0.9, 0.99))
        critic = self.stage.critic
        optim_critic = None
        if critic is not None:
            critic.to(self.device).train()
            optim_critic = torch.optim.Adam(critic.parameters(), lr=c.lr_discriminator or c.lr, betas=(0.9, 0.99))
            if self.stage.critic_optimizer_state is not None and not resume:  # init_critic's
                optim_critic.load_state_dict(self.stage.critic_optimizer_state)
                for group in optim_critic.param_groups:
                    group["lr"] = c.lr_discriminator or c.lr  # this run's rate, not the source's
        if resume:
            self._resume(optim, optim_critic)
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "train_config.json").write_text(json.dumps(c.to_dict(), indent=2) + "\n")
        log = (self.output / LOG_NAME).open("a")
        running: dict[str, float] = {}
        started = time.perf_counter() - self.elapsed
        bar = tqdm(total=c.steps, initial=self.step, desc=c.stage, unit="step", disable=self.progress is False)
        try:
            while self._progress() < 1:
                for group in optim.param_groups:
                    group["lr"] = c.lr * lr_factor(c, self.step, self._progress())
                batch = self.batch()
                with self._autocast():
                    terms = self.stage.losses(batch)
                loss = sum(terms.values())
                assert isinstance(loss, torch.Tensor)  # every stage returns at least one loss term
                if not torch.isfinite(loss):
                    raise ConfigError(f"loss became {loss.item()} at step {self.step}; lower lr")
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
                optim.step()
                if self.average is not None:
                    self.average.update(self.step + 1)
                if optim_critic is not None:
                    with self._autocast():
                        terms["critic"] = self.stage.critic_loss(batch)
                    optim_critic.zero_grad(set_to_none=True)
                    terms["critic"].backward()
                    optim_critic.step()
                self.step += 1
                self.elapsed = time.perf_counter() - started
                done = self._progress() >= 1
                for k, v in {"total": loss.detach(), **terms}.items():
                    running[k] = running.get(k, 0.0) + float(v.detach())
                bar.update(1)
                if self.step % c.log_every == 0 or done:
                    count = c.log_every if self.step % c.log_every == 0 else self.step % c.log_every
                    means = {k: v / count for k, v in running.items()}
                    record = {"step": self.step, "lr": optim.param_groups[0]["lr"], "loss": means,
                              "elapsed_s": round(self.elapsed, 2)}  # fmt: skip
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{means['total']:.4f}")
                    running.clear()
                if self.step % c.checkpoint_every == 0 or done:
                    self._checkpoint(optim, optim_critic)
        finally:
            bar.close()
            log.close()
        model.eval()
        final = self.output / FINAL_NAME
        with self._saved_weights():
            self.stage.save(final, self._provenance())
        return final

    def _saved_weights(self) -> contextlib.AbstractContextManager[None]:
        return self.average.applied() if self.average is not None else contextlib.nullcontext()

    # -- checkpoints -------------------------------------------------------------------------
    def _provenance(self) -> dict[str, Any]:
        # Keyed by stage, so a stage-2 checkpoint still records how its stage-1 start was trained.
        record = {"steps": self.step, "seconds": round(self.elapsed, 1), "device": str(self.device),
                  "pairs": "+".join(p.fingerprint for p in self.pair_sets),
                  "photos": len(frozenset().union(*(p.photos for p in self.pair_sets)))}  # fmt: skip
        if self.config.ema_decay is not None:
            record["weights"] = f"moving average, decay {self.config.ema_decay}"
        if self.config.freeze:
            record["frozen"] = list(self.config.freeze)
        return {self.record_key: record}

    def _checkpoint(self, optim: torch.optim.Optimizer, optim_critic: torch.optim.Optimizer | None) -> None:
        folder = self.output / f"checkpoint-{self.step:06d}"
        with self._saved_weights():
            self.stage.save(folder, self._provenance())
        state = {"step": self.step, "elapsed": self.elapsed, "optimizer": optim.state_dict(),
                 "generator": self.gen.get_state(), "trained": list(self.trained)}  # fmt: skip
        if self.average is not None:
            state["live_weights"] = self.average.live_weights()
        stage_gen = getattr(self.stage, "gen", None)
        if stage_gen is not None:
            state["stage_generator"] = stage_gen.get_state()
        if optim_critic is not None and self.stage.critic is not None:
            state["critic"] = self.stage.critic.state_dict()
            state["critic_optimizer"] = optim_critic.state_dict()
        torch.save(state, folder / (STATE_NAME + ".tmp"))
        (folder / (STATE_NAME + ".tmp")).replace(folder / STATE_NAME)  # written last: marks it complete
        for old in checkpoints(self.output)[: -self.config.keep_checkpoints]:
            shutil.rmtree(old)

    def _resume(self, optim: torch.optim.Optimizer, optim_critic: torch.optim.Optimizer | None) -> None:
        found = checkpoints(self.output)
        if not found:
            raise ConfigError(f"{self.output}: no checkpoint to resume from")
        folder = found[-1]
        self.stage.load_weights(folder)
        self.stage.model.to(self.device)
        state = torch.load(folder / STATE_NAME, map_location=self.device, weights_only=False)
        if state.get("trained", list(self.trained)) != list(self.trained):
            # Adam's moments (and the live weights) belong to the parameters trained then: a run
            # that now trains others (another ``freeze``, say) would pair them with the wrong ones.
            added = sorted(set(self.trained) - set(state["trained"]))
            dropped = sorted(set(state["trained"]) - set(self.trained))
            change = f"now trains {added[0]}" if added else f"no longer trains {dropped[0]}" if dropped else "order"
            raise ConfigError(f"{folder}: this run trains other parameters than the checkpoint ({change}); "
                              "resume with the settings it was saved with")  # fmt: skip
        if self.average is not None:
            if "live_weights" not in state:
                raise ConfigError(f"{folder}: saved without ema_decay; resume it without ema_decay too")
            self.average.reset_from_model()  # the checkpoint's model files hold the average
            self.average.load_live_weights(state["live_weights"])
        elif "live_weights" in state:
            raise ConfigError(f"{folder}: saved with ema_decay; resume it with the same ema_decay")
        optim.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        if "stage_generator" in state:
            self.stage.gen.set_state(state["stage_generator"])  # type: ignore[attr-defined]
        if optim_critic is not None and self.stage.critic is not None:
            self.stage.critic.load_state_dict(state["critic"])
            optim_critic.load_state_dict(state["critic_optimizer"])
        self.step, self.elapsed = state["step"], state["elapsed"]


def train(config: TrainConfig, resume: bool = False, progress: bool | None = None) -> Path:
    return Trainer(config, progress).train(resume)
