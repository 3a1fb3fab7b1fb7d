"""The student interface: per-sample alphas, sweeps that encode once, adapter merging (sd21, rrdb)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import (
    compact_config,
    count_calls,
    make_compact,
    make_rrdb,
    make_sd21,
    perturb_lora,
    photo_crop,
    with_band_split,
)
from peft.tuners.tuners_utils import BaseTunerLayer

import models
from models.bandsplit import gaussian_blur
from models.presets import load_preset

#: ``compact-direct``: the compact family with the LR skip and the LR-size upsampler.
FAMILIES = ["compact", "compact-direct", "compact-film", "compact-delta", "compact-bend", "rrdb", "sd21"]
#: compact and rrdb have no normalisation; sd21's GroupNorm/attention reductions depend a little on batch.
TOL = {
    "compact": 1e-5,
    "compact-direct": 1e-5,
    "compact-film": 1e-5,
    "compact-delta": 1e-5,
    "compact-bend": 1e-5,
    "rrdb": 1e-5,
    "sd21": 1e-4,
}


def _make_compact_direct() -> models.CTSRStudent:
    return make_compact(upsampler="direct", lr_skip=True)


def _make_compact_film() -> models.CTSRStudent:
    return make_compact(upsampler="direct", lr_skip=True, path_film=True)


def _make_compact_delta() -> models.CTSRStudent:
    return make_compact(upsampler="direct", lr_skip=True, path_delta=True)


def _make_compact_bend() -> models.CTSRStudent:
    return make_compact(upsampler="direct", lr_skip=True, path_delta=True, path_bend=True)


def _student(family: str) -> models.CTSRStudent:
    return {
        "compact": make_compact,
        "compact-direct": _make_compact_direct,
        "compact-film": _make_compact_film,
        "compact-delta": _make_compact_delta,
        "compact-bend": _make_compact_bend,
        "rrdb": make_rrdb,
        "sd21": make_sd21,
    }[family]()


def _lr(family: str, batch: int) -> torch.Tensor:
    w, h = (16, 12) if family == "sd21" else (24, 20)
    return torch.stack([photo_crop(7 + 19 * i, 5 + 11 * i, w, h) for i in range(batch)])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_alpha_batch_equals_single_runs(family: str) -> None:
    student, lr = _student(family), _lr(family, 3)
    alphas = [0.0, 0.3, 1.0]
    with torch.no_grad():
        batched = student(lr, torch.tensor(alphas))
        singles = [student(lr[i : i + 1], a)[0] for i, a in enumerate(alphas)]
        # the same first sample at the two ends of the range: alpha has to matter
        ends = student(lr[:1].expand(2, -1, -1, -1), torch.tensor([0.0, 1.0]))
    assert batched.shape == (3, 3, lr.shape[2] * 4, lr.shape[3] * 4)
    assert _max_diff(ends[0], ends[1]) > 100 * TOL[family]
    for i, single in enumerate(singles):
        assert _max_diff(batched[i], single) <= TOL[family], f"sample {i} (alpha {alphas[i]})"


@pytest.mark.parametrize("family", FAMILIES)
def test_scalar_alpha_broadcasts(family: str) -> None:
    student, lr = _student(family), _lr(family, 2)
    with torch.no_grad():
        assert _max_diff(student(lr, 0.5), student(lr, torch.tensor([0.5, 0.5]))) <= TOL[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_equals_separate_forwards(family: str) -> None:
    student, lr = _student(family), _lr(family, 2)
    alphas = [0.0, 0.5, 1.0]
    with torch.no_grad():
        sweep = student.sweep(lr, alphas)
        separate = [student(lr, a) for a in alphas]
    assert sweep.shape == (3, 2, 3, lr.shape[2] * 4, lr.shape[3] * 4)
    assert _max_diff(separate[0], separate[2]) > 100 * TOL[family]
    for i, a in enumerate(alphas):
        assert _max_diff(sweep[i], separate[i]) <= TOL[family], f"alpha {a}"


@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_encodes_and_predicts_velocity_once(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    student, lr = _student(family), _lr(family, 2)
    batch_size = lambda x: x.shape[0]  # noqa: E731
    encode = count_calls(monkeypatch, student, "encode", batch_size)
    velocity = count_calls(monkeypatch, student, "velocity", batch_size)
    decode = count_calls(monkeypatch, student, "decode", batch_size)

    with torch.no_grad():
        student.sweep(lr, [0.0, 0.5, 1.0])
    assert encode.calls == [2]
    assert velocity.calls == [2]
    # 2 samples x 3 alphas = 6 latents, decoded in chunks of the input batch size (2)
    assert decode.calls == [2, 2, 2]


def test_generate_decode_chunks_and_per_sample_alpha_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    student, lr = make_compact(), _lr("compact", 3)
    batch_size = lambda x: x.shape[0]  # noqa: E731
    encode = count_calls(monkeypatch, student, "encode", batch_size)
    velocity = count_calls(monkeypatch, student, "velocity", batch_size)
    decode = count_calls(monkeypatch, student, "decode", batch_size)
    alphas = [[0.0], [0.25, 0.75, 1.0], [0.5, 0.0]]
    with torch.no_grad():
        outputs = student.generate(lr, alphas, decode_batch=4)
    assert encode.calls == [3] and velocity.calls == [3]
    assert decode.calls == [4, 2]  # 6 latents in chunks of 4
    assert decode.count == math.ceil(6 / 4)
    assert [tuple(o.shape) for o in outputs] == [(n, 3, 80, 96) for n in (1, 3, 2)]
    with torch.no_grad():
        for i, sample_alphas in enumerate(alphas):
            for j, a in enumerate(sample_alphas):
                expected = student(lr[i : i + 1], a)[0]
                assert _max_diff(outputs[i][j], expected) <= 1e-5, (i, a)


def test_alpha_zero_skips_velocity(monkeypatch: pytest.MonkeyPatch) -> None:
    student, lr = make_compact(), _lr("compact", 2)
    velocity = count_calls(monkeypatch, student, "velocity")
    with torch.no_grad():
        student(lr, 0.0)
        student.sweep(lr, [0.0])
        student.generate(lr, [[0.0], [0.0, 0.0]])
        assert velocity.count == 0
        student(lr, torch.tensor([0.0, 0.5]))
    assert velocity.count == 1


def test_generate_rejects_mismatched_alpha_lists() -> None:
    student, lr = make_compact(), _lr("compact", 2)
    with pytest.raises(ValueError, match="2 inputs but 1 alpha lists"):
        student.generate(lr, [[0.5]])


def test_compact_output_depends_on_alpha_linearly_in_latent() -> None:
    """z_alpha = z0 + alpha * v: decoding the mixed latent by hand gives the student's output."""
    student, lr = make_compact(), _lr("compact", 1)
    with torch.no_grad():
        z0 = student.encode(lr)
        v = student.velocity(z0)
        by_hand = student.decode(z0 + 0.3 * v)
        assert _max_diff(student(lr, 0.3), by_hand) <= 1e-6


def test_compact_lr_skip_starts_as_bicubic_and_its_latent_carries_the_input() -> None:
    """A new LR-skip student is bicubic upscaling at every alpha (its head starts at zero); the
    latent carries the input unchanged and the velocity never moves it."""
    student, lr = make_compact(upsampler="direct", lr_skip=True), _lr("compact", 2)
    student.decoder[-2].weight.data.zero_()  # undo make_compact's random head: the state as built
    bicubic = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    with torch.no_grad():
        z0 = student.encode(lr)
        v = student.velocity(z0)
        assert _max_diff(student.sweep(lr, [0.0, 1.0]), bicubic.expand(2, -1, -1, -1, -1)) <= 1e-6
    latent = student.arch.latent_channels
    assert z0.shape[1] == latent + 3 and torch.equal(z0[:, latent:], lr)
    assert float(v[:, :latent].abs().max()) > 0 and not v[:, latent:].any()


def test_compact_direct_upsampler_runs_no_convolution_above_lr_size() -> None:
    student, lr = _make_compact_direct(), _lr("compact", 1)
    sizes = []
    for m in student.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda _m, inputs, _o: sizes.append(inputs[0].shape[-2:]))
    with torch.no_grad():
        student(lr, 0.5)
    assert sizes and all(tuple(s) == tuple(lr.shape[-2:]) for s in sizes)


@pytest.mark.parametrize("option", ["path_film", "path_delta"])
def test_compact_path_options_start_as_the_same_weights_without_them_and_read_alpha_from_the_latent(
    option: str,
) -> None:
    """The path modulation (``path_film``) and the decoder's path branches (``path_delta``) are zero
    when built: such a student with another one's weights decodes like it at every alpha (how
    ``init_weights`` continues a release). The latent's last channel is the path position: 0 in
    ``z0``, 1 in ``v``, so alpha in the mixed latent; once the new parameters are non-zero they
    change every alpha but 0. They train in stage 2 while the decoder's own weights stay frozen."""
    plain, lr = _make_compact_direct(), _lr("compact", 2)
    student = models.build_student(compact_config(upsampler="direct", lr_skip=True, **{option: True})).eval()
    student.load_state_dict(plain.state_dict(), strict=False)
    added = student.film if option == "path_film" else student.delta
    alphas = [0.0, 0.4, 1.0]
    with torch.no_grad():
        assert _max_diff(student.sweep(lr, alphas), plain.sweep(lr, alphas)) == 0
        z0 = student.encode(lr)
        v = student.velocity(z0)
        mixed = student.mix(z0, v, torch.tensor([0.4, 1.0]))
        plain_z0 = plain.encode(lr)
        plain_v = plain.velocity(plain_z0)
        for p in added.parameters():
            torch.nn.init.normal_(p, std=0.01)
        moved = [_max_diff(student(lr, a), plain(lr, a)) for a in alphas]
    assert not z0[:, -1].any() and bool((v[:, -1] == 1).all())
    assert torch.allclose(mixed[:, -1].mean((1, 2)), torch.tensor([0.4, 1.0]))
    assert _max_diff(z0[:, :-1], plain_z0) == 0 and _max_diff(v[:, :-1], plain_v) == 0
    assert moved[0] == 0 and moved[1] > 1e-3 and moved[2] > moved[1]
    trainable = {id(p) for p in student.trainable_parameters("stage2")}
    assert all(id(p) in trainable for p in added.parameters())
    assert not any(id(p) in trainable for p in student.decoder.parameters())


def test_compact_path_bend_moves_only_the_middle_of_the_path() -> None:
    """``path_bend``'s branches are scaled by ``p(1 - p)``: zero when built, and once trained they
    change every alpha strictly between the ends and neither end; they train in stage 2."""
    delta = _make_compact_delta()
    student = models.build_student(
        compact_config(upsampler="direct", lr_skip=True, path_delta=True, path_bend=True)
    ).eval()
    student.load_state_dict(delta.state_dict(), strict=False)
    lr, alphas = _lr("compact", 2), [0.0, 0.25, 0.5, 1.0]
    with torch.no_grad():
        assert _max_diff(student.sweep(lr, alphas), delta.sweep(lr, alphas)) == 0
        for p in student.bend.parameters():
            torch.nn.init.normal_(p, std=0.02)
        moved = [_max_diff(student(lr, a), delta(lr, a)) for a in alphas]
    assert moved[0] == 0 and moved[3] == 0 and moved[1] > 1e-3 and moved[2] > 1e-3
    trainable = {id(p) for p in student.trainable_parameters("stage2")}
    assert all(id(p) in trainable for p in student.bend.parameters())


@pytest.mark.parametrize(
    "arch",
    [
        {"upsampler": "bilinear"},
        {"lr_skip": "yes"},
        {"path_film": 1},
        {"features": True},
        {"path_delta": True},
        {"path_bend": True},
    ],
)
def test_compact_bad_upsampler_settings_are_refused(arch: dict[str, object]) -> None:
    config = load_preset("compact-x4")
    config.arch = {**config.arch, **arch}
    with pytest.raises(models.ConfigError, match=next(iter(arch))):
        models.build_student(config)


# -- sd21 adapters ----------------------------------------------------------------------------
def _lora_layers(module: torch.nn.Module) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


def test_sd21_fused_matches_unfused() -> None:
    student, lr = make_sd21(), _lr("sd21", 2)
    alphas = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        z0 = student.encode(lr)
        v = student.velocity(z0)
        unfused = student(lr, alphas)
        sweep = student.sweep(lr, [0.0, 0.5, 1.0])
        # the perturbed LoRAs are what this test is about: without them the output differs
        torch.manual_seed(0)
        plain = models.build_student(load_preset("sd21-tiny")).eval()
        assert _max_diff(plain(lr, alphas), unfused) > 1e-3
    assert _max_diff(unfused[0], unfused[1]) > 1e-2
    assert _lora_layers(student.unet) > 0 and _lora_layers(student.vae) > 0

    student.prepare_for_inference()
    assert student.unet_velocity is not None
    for module in (student.unet, student.unet_velocity, student.vae):
        assert _lora_layers(module) == 0, "fusing must remove every LoRA wrapper"
    with torch.no_grad():
        assert _max_diff(student.velocity(z0), v) <= 1e-4
        assert _max_diff(student(lr, alphas), unfused) <= 1e-4
        assert _max_diff(student.sweep(lr, [0.0, 0.5, 1.0]), sweep) <= 1e-4
        student.prepare_for_inference()  # a second call is a no-op
        assert _max_diff(student(lr, alphas), unfused) <= 1e-4


def test_sd21_unfused_uses_student_adapter_for_encode_and_velocity_adapter_for_velocity() -> None:
    """Leaving the wrong adapter active would silently change the output."""
    student, lr = make_sd21(), _lr("sd21", 1)
    with torch.no_grad():
        z0_first = student.encode(lr)
        v = student.velocity(z0_first)
        z0_again = student.encode(lr)  # after velocity() switched adapters
        v_again = student.velocity(z0_again)
    assert torch.equal(z0_first, z0_again)
    assert torch.equal(v, v_again)
    assert _max_diff(v, z0_first) > 1e-3


def test_sd21_size_multiple_and_output_size() -> None:
    student = make_sd21()
    assert student.size_multiple == 1  # tiny VAE /2 and UNet /2 against x4
    with torch.no_grad():
        out = student(photo_crop(0, 0, 13, 9)[None], 0.5)
    assert out.shape == (1, 3, 36, 52)


# -- rrdb: the student on a pretrained prior ----------------------------------------------------
def test_rrdb_untrained_velocity_leaves_alpha_without_effect() -> None:
    """The velocity's last conv starts at zero: before stage 2, every alpha is the alpha = 0 output."""
    student, lr = make_rrdb(velocity=False), _lr("rrdb", 2)
    with torch.no_grad():
        sweep = student.sweep(lr, [0.0, 0.5, 1.0])
    assert torch.equal(sweep[0], sweep[1]) and torch.equal(sweep[0], sweep[2])


def test_rrdb_untrained_adapters_are_the_prior_itself() -> None:
    torch.manual_seed(0)
    student = models.build_student(load_preset("rrdb-tiny")).eval()
    lr = _lr("rrdb", 2)
    with torch.no_grad():
        prior_out = student.net(lr)  # the wrapped RRDBNet's own forward, adapters at zero
        assert _max_diff(student(lr, 1.0), prior_out) <= 1e-6
        perturb_lora(student)
        assert _max_diff(student(lr, 0.0), prior_out) > 1e-3


def test_rrdb_merged_matches_unmerged_and_shares_the_trunk(monkeypatch: pytest.MonkeyPatch) -> None:
    student, lr = make_rrdb(), _lr("rrdb", 2)
    alphas = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        unmerged = student(lr, alphas)
        sweep = student.sweep(lr, [0.0, 0.5, 1.0])
    assert _lora_layers(student.net) > 0
    student.prepare_for_inference()
    assert _lora_layers(student.net) == 0, "merging must remove every LoRA wrapper"
    trunk = count_calls(monkeypatch, student.net.conv_first, "forward", lambda x: x.shape[0])
    with torch.no_grad():
        assert _max_diff(student(lr, alphas), unmerged) <= 1e-5
        assert _max_diff(student.sweep(lr, [0.0, 0.5, 1.0]), sweep) <= 1e-5
    assert trunk.calls == [2, 2]  # one trunk pass per call, whatever the number of alphas
    with pytest.raises(models.ConfigError, match="merged"):
        student.state_files()


def test_rrdb_encoder_cache_resumes_encode_exactly() -> None:
    student, lr = make_rrdb(), _lr("rrdb", 2)
    with torch.no_grad():
        cached = student.encoder_cache(lr)
        assert set(cached) == {"feat", "trunk"} and cached["trunk"].shape[-2:] == lr.shape[-2:]
        assert torch.equal(student.encode_cached(cached), student.encode(lr))


# -- rrdb with a branch velocity: the fidelity teacher's own last blocks -------------------------
def _branch_student_and_teacher() -> tuple[models.CTSRStudent, torch.nn.Module]:
    """A tiny branch student on a random prior, and a "fidelity teacher": the prior with its last
    block and conv_body changed (as fine-tuning changes them), same tail."""
    import copy

    torch.manual_seed(3)
    student = models.build_student(load_preset("rrdb-tiny-branch")).eval()
    teacher = copy.deepcopy(student.net)
    from models.archs.lora import merge_and_strip

    merge_and_strip(teacher, "student")  # adapters are zero: the prior itself
    with torch.no_grad():
        for p in [*teacher.body[-1].parameters(), *teacher.conv_body.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    return student, teacher.eval()


def test_rrdb_branch_untrained_leaves_alpha_without_effect() -> None:
    student, _ = _branch_student_and_teacher()
    lr = _lr("rrdb", 2)
    with torch.no_grad():
        sweep = student.sweep(lr, [0.0, 0.5, 1.0])
    assert torch.equal(sweep[0], sweep[1]) and torch.equal(sweep[0], sweep[2])


def test_rrdb_branch_warm_start_puts_alpha_1_on_the_fidelity_teacher() -> None:
    student, teacher = _branch_student_and_teacher()
    lr = _lr("rrdb", 2)
    with torch.no_grad():
        prior_out = student(lr, 0.0)
        student.warm_start_velocity(teacher)
        ends = student(lr, torch.tensor([0.0, 1.0]))
        halfway = student(lr, 0.5)
    assert _max_diff(ends[0], prior_out[0]) <= 1e-6  # alpha = 0 untouched
    assert _max_diff(ends[1], teacher(lr)[1]) <= 1e-5  # alpha = 1 is the teacher (it shares the tail here)
    assert _max_diff(halfway, prior_out) > 1e-3 and _max_diff(halfway, teacher(lr)) > 1e-3
    with pytest.raises(models.ConfigError, match="architecture"):
        student.warm_start_velocity(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(models.ConfigError, match="velocity_init"):
        make_compact().warm_start_velocity(teacher)


def test_rrdb_branch_round_trips_merges_and_shares_the_trunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    student, teacher = _branch_student_and_teacher()
    perturb_lora(student)
    student.warm_start_velocity(teacher)
    lr = _lr("rrdb", 2)
    with torch.no_grad():
        before = student.sweep(lr, [0.0, 0.5, 1.0])
    loaded = models.load_student(student.save_pretrained(tmp_path / "b")).eval()
    loaded.prepare_for_inference()
    trunk = count_calls(monkeypatch, loaded.net.conv_first, "forward", lambda x: x.shape[0])
    with torch.no_grad():
        assert _max_diff(loaded.sweep(lr, [0.0, 0.5, 1.0]), before) <= 1e-5
    assert trunk.calls == [2]


# -- band-split decoding: the low band runs ahead of the detail along the path -------------------
def test_band_split_keeps_the_ends_and_takes_the_low_band_from_further_along() -> None:
    student, teacher = _branch_student_and_teacher()
    student.warm_start_velocity(teacher)
    split, lr = with_band_split(student, sigma=2.0, lead=4.0), _lr("rrdb", 2)
    with torch.no_grad():
        plain = dict(zip([0.0, 0.1, 0.4, 0.5, 1.0], student.sweep(lr, [0.0, 0.1, 0.4, 0.5, 1.0]), strict=True))
        ends = split(lr, torch.tensor([0.0, 1.0]))
        assert _max_diff(ends[0], plain[0.0][0]) <= 1e-6 and _max_diff(ends[1], plain[1.0][1]) <= 1e-6
        # alpha 0.5: detail from z_0.5, low band from z_1 (lead 4 reaches the end at 0.25)
        expected = plain[0.5] + gaussian_blur(plain[1.0] - plain[0.5], 2.0)
        assert _max_diff(split(lr, 0.5), expected) <= 1e-5
        # alpha 0.1: low band from z_0.4
        expected = plain[0.1] + gaussian_blur(plain[0.4] - plain[0.1], 2.0)
        assert _max_diff(split(lr, 0.1), expected) <= 1e-5
        assert _max_diff(split(lr, 0.5), plain[0.5]) > 1e-3  # the split changes the middle
        # per-sample alphas in one batch, and a sweep, give what single runs give
        mixed = split(lr, torch.tensor([0.1, 0.5]))
        assert _max_diff(mixed[0], split(lr[:1], 0.1)[0]) <= 1e-5
        assert _max_diff(mixed[1], split(lr[1:], 0.5)[0]) <= 1e-5
        sweep = split.sweep(lr, [0.0, 0.1, 0.5, 1.0])
        assert _max_diff(sweep[1], split(lr, 0.1)) <= 1e-5 and _max_diff(sweep[2], split(lr, 0.5)) <= 1e-5


def test_band_split_decodes_each_path_position_once(monkeypatch: pytest.MonkeyPatch) -> None:
    student, teacher = _branch_student_and_teacher()
    student.warm_start_velocity(teacher)
    split, lr = with_band_split(student, sigma=2.0, lead=4.0), _lr("rrdb", 2)
    decode = count_calls(monkeypatch, split, "decode", lambda x: x.shape[0])
    with torch.no_grad():
        split.sweep(lr, [0.0, 0.25, 0.5, 0.75, 1.0])  # every low band sits at alpha 0 or 1: no extra decode
        assert sum(decode.calls) == 2 * 5
        decode.calls.clear()
        split(lr, 0.5)  # one alpha in the middle: its detail and its low band
        assert sum(decode.calls) == 2 * 2
        decode.calls.clear()
        split(lr, torch.tensor([0.0, 1.0]))  # the ends need nothing more
        assert sum(decode.calls) == 2


def test_band_split_with_an_untrained_velocity_leaves_alpha_without_effect() -> None:
    student, _ = _branch_student_and_teacher()
    split = with_band_split(student, sigma=2.0, lead=4.0)
    with torch.no_grad():
        sweep = split.sweep(_lr("rrdb", 2), [0.0, 0.1, 0.5, 1.0])
    assert all(torch.equal(sweep[0], sweep[k]) for k in (1, 2, 3))


def test_band_split_round_trips_and_bad_settings_are_refused(tmp_path: Path) -> None:
    student, teacher = _branch_student_and_teacher()
    student.warm_start_velocity(teacher)
    split, lr = with_band_split(student, sigma=3.0, lead=4.0), _lr("rrdb", 1)
    folder = split.save_pretrained(tmp_path / "split")
    on_disk = json.loads((folder / "config.json").read_text())
    assert on_disk["band_split"] == {"sigma": 3.0, "lead": 4.0} and on_disk["format_version"] == 2
    loaded = models.load_student(folder).eval()
    with torch.no_grad():
        assert _max_diff(loaded(lr, 0.5), split(lr, 0.5)) <= 1e-6
    for bad, message in [
        ({"sigma": 3.0}, "'sigma' and 'lead'"),
        ({"sigma": 0, "lead": 4}, "sigma must be > 0"),
        ({"sigma": 3, "lead": 0.5}, "lead must be >= 1"),
        ({"sigma": "wide", "lead": 4}, "must be numbers"),
    ]:
        on_disk["band_split"] = bad
        (folder / "config.json").write_text(json.dumps(on_disk))
        with pytest.raises(models.CheckpointError, match=message):
            models.load_student(folder)


# -- path_end: alpha = 1 decodes a point short of the trained path's end (ctsr model calibrate) ----
def _with_path_end(student: models.CTSRStudent, path_end: float) -> models.CTSRStudent:
    cut = models.build_student(dataclasses.replace(student.config, path_end=path_end)).eval()
    cut.load_state_files(student.state_files())
    return cut


def test_path_end_maps_alpha_linearly_onto_the_start_of_the_path(tmp_path: Path) -> None:
    student, lr = _make_compact_direct(), _lr("compact-direct", 2)
    cut = _with_path_end(student, 0.8)
    with torch.no_grad():
        raw = student.sweep(lr, [0.0, 0.4, 0.8, 1.0])
        assert _max_diff(cut.sweep(lr, [0.0, 0.5, 1.0]), raw[:3]) <= 1e-6
        mixed = cut(lr, torch.tensor([1.0, 0.5]))  # per-sample alphas in one batch
        assert _max_diff(mixed[0], raw[2][0]) <= 1e-6 and _max_diff(mixed[1], raw[1][1]) <= 1e-6
        assert _max_diff(cut(lr, 1.0), raw[3]) > 1e-3  # alpha = 1 is no longer the path's end
        # with band-split decoding, the low band's position is cut too: at alpha .25, lead 2, the
        # detail comes from path position .2 and the low band from .4
        split_cut, split_raw = with_band_split(cut, sigma=2.0, lead=2.0), with_band_split(student, sigma=2.0, lead=2.0)
        assert _max_diff(split_cut(lr, 0.25), split_raw(lr, 0.2)) <= 1e-6
        assert _max_diff(split_cut(lr, 1.0), raw[2]) <= 1e-6
    folder = cut.save_pretrained(tmp_path / "cut")
    on_disk = json.loads((folder / "config.json").read_text())
    assert on_disk["path_end"] == 0.8 and on_disk["format_version"] == 3  # older readers refuse it
    with torch.no_grad():
        assert _max_diff(models.load_student(folder)(lr, 1.0), raw[2]) <= 1e-6
    for bad in (0, 1.5, -0.2, "far", True, float("nan")):
        on_disk["path_end"] = bad
        (folder / "config.json").write_text(json.dumps(on_disk))
        with pytest.raises(models.CheckpointError, match=r"config.json: path_end must be a number in \(0, 1\]"):
            models.load_student(folder)


def test_gaussian_blur_keeps_flat_images_and_handles_images_smaller_than_its_radius() -> None:
    flat = torch.full((1, 3, 5, 7), 0.25)
    assert torch.allclose(gaussian_blur(flat, 3.0), flat)  # radius 9 > the image: replicated edges
    image = photo_crop(3, 4, 40, 30)[None]
    blurred = gaussian_blur(image, 2.0)
    assert blurred.shape == image.shape
    assert float(blurred.std()) < float(image.std())


def test_a_family_must_implement_the_whole_interface() -> None:
    class Half(models.CTSRStudent):  # no decode, no checkpoint contract
        family = "half"

        def encode(self, lr: torch.Tensor) -> torch.Tensor:
            return lr

        def velocity(self, z0: torch.Tensor) -> torch.Tensor:
            return z0

    with pytest.raises(TypeError, match="abstract"):
        Half(make_compact().config)
