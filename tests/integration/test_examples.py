"""The scripts in examples/ on the real default model: each result checked against the model."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from examples import activation_patching, direct_logit_attribution, logit_lens

import kvlens

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model():
    return kvlens.HookedTransformer.from_pretrained(progress=False)


def _final_logits(model, prompt):
    with torch.no_grad():
        return model(prompt)[0, -1]


def test_logit_lens_last_row_is_the_models_prediction(model, capsys):
    lens = logit_lens.main(model, PROMPT)

    logits = _final_logits(model, PROMPT)
    assert len(lens.rows) == model.cfg.n_layers + 1
    assert lens.rows[-1].label == "final_post"
    assert lens.answer == model.to_single_str_token(int(logits.argmax())) == " Paris"
    assert lens.rows[-1].top_token == lens.answer
    assert lens.rows[-1].answer_rank == 0
    torch.testing.assert_close(lens.lens_logits[-1], logits, atol=1e-4, rtol=1e-5)
    assert "final_post" in capsys.readouterr().out


@pytest.mark.parametrize("layer", [0, 17, 29])
def test_logit_lens_reads_each_layer_through_the_final_norm(model, layer):
    lens = logit_lens.logit_lens(model, PROMPT)

    # Independently of the cache: the residual entering `layer`, normalized as a final residual.
    with torch.no_grad():
        resid = model(PROMPT, stop_at_layer=layer)[:, -1]
        x = resid / (resid.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        expected = (x * model.ln_final.w) @ model.W_U + model.b_U
    assert lens.rows[layer].label == f"{layer}_pre"
    torch.testing.assert_close(lens.lens_logits[layer], expected[0], atol=1e-4, rtol=1e-4)


def test_attributions_add_up_to_the_logit_difference(model, capsys):
    result = direct_logit_attribution.main(model, PROMPT, " Paris", " London")

    logits = _final_logits(model, PROMPT)
    expected = float(
        logits[model.to_single_token(" Paris")] - logits[model.to_single_token(" London")]
    )
    assert result.logit_diff == pytest.approx(expected, abs=1e-4)
    total = float(result.attributions.sum()) + result.unembed_bias_diff
    assert total == pytest.approx(expected, abs=1e-3)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert result.head_attributions.shape == (n_layers, n_heads)
    assert len(result.labels) == n_layers * n_heads + n_layers + 2  # heads, MLPs, embed, bias
    assert "the model's logit difference" in capsys.readouterr().out


def test_one_heads_attribution_by_hand(model):
    layer, head = 23, 4
    result = direct_logit_attribution.direct_logit_attribution(model, PROMPT, " Paris", " London")

    with torch.no_grad():
        _, cache = model.run_with_cache(PROMPT)
        out = cache["z", layer][0, -1, head] @ model.W_O[layer, head]
        final = cache["resid_post", model.cfg.n_layers - 1][0, -1]
        scale = (final.pow(2).mean() + model.cfg.eps).sqrt()
        direction = (
            model.W_U[:, model.to_single_token(" Paris")]
            - model.W_U[:, model.to_single_token(" London")]
        )
        expected = float((out / scale * model.ln_final.w) @ direction)
    assert float(result.head_attributions[layer, head]) == pytest.approx(expected, abs=1e-4)


def test_swapping_the_answers_negates_every_attribution(model):
    forward = direct_logit_attribution.direct_logit_attribution(model, PROMPT, " Paris", " London")
    backward = direct_logit_attribution.direct_logit_attribution(model, PROMPT, " London", " Paris")

    torch.testing.assert_close(backward.attributions, -forward.attributions)


@pytest.fixture(scope="module")
def patching(model):
    return activation_patching.main(model)


def test_patching_metrics_are_the_models_logit_differences(model, patching):
    paris, berlin = model.to_single_token(" Paris"), model.to_single_token(" Berlin")
    for prompt, metric in [
        (activation_patching.CLEAN_PROMPT, patching.clean_metric),
        (activation_patching.CORRUPTED_PROMPT, patching.corrupted_metric),
    ]:
        logits = _final_logits(model, prompt)
        assert metric == pytest.approx(float(logits[paris] - logits[berlin]), abs=1e-3)
    assert patching.clean_metric > 0 > patching.corrupted_metric
    assert patching.recovery.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert bool(patching.recovery.isfinite().all())


@pytest.mark.parametrize(("layer", "head"), [(0, 0), (23, 4), (29, 1)])
def test_batched_patching_equals_one_run_per_head(model, patching, layer, head):
    clean, corrupted = activation_patching.CLEAN_PROMPT, activation_patching.CORRUPTED_PROMPT
    _, clean_cache = model.run_with_cache(clean, names_filter=kvlens.get_act_name("z", layer))

    def patch(z, hook):
        z[:, :, head] = clean_cache["z", layer][:, :, head]
        return z

    # The plain TransformerLens way: a whole forward pass with one hook, logits and all.
    with torch.no_grad():
        logits = model.run_with_hooks(
            corrupted, fwd_hooks=[(kvlens.get_act_name("z", layer), patch)]
        )[0, -1]
    expected = float(
        logits[model.to_single_token(" Paris")] - logits[model.to_single_token(" Berlin")]
    )
    assert float(patching.patched_metric[layer, head]) == pytest.approx(expected, abs=1e-3)


def test_patching_a_subset_of_layers_gives_those_rows(model, patching):
    subset = activation_patching.patch_heads(model, layers=[23, 5])

    torch.testing.assert_close(subset.recovery, patching.recovery[[23, 5]], atol=1e-5, rtol=1e-4)


def test_patching_and_attribution_find_the_same_head(model, patching):
    """The head whose clean output restores most of the answer is the one writing it directly."""
    attribution = direct_logit_attribution.direct_logit_attribution(
        model, activation_patching.CLEAN_PROMPT, " Paris", " Berlin"
    )
    best_patched = int(patching.recovery.argmax())
    best_direct = int(attribution.head_attributions.argmax())
    assert best_patched == best_direct
    assert float(patching.recovery.flatten()[best_patched]) > 0.5


def test_prompts_of_different_lengths_are_refused(model):
    with pytest.raises(ValueError, match="one token length"):
        activation_patching.patch_heads(model, corrupted="The capital city of Germany is")


@pytest.mark.parametrize(
    "script", ["logit_lens", "direct_logit_attribution", "activation_patching"]
)
def test_scripts_run_from_the_command_line(script):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{script}.py"), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
