"""Several reference embeddings of one person (`instantid_lab.references`): the combiners, the `References`
record the pipeline takes as `face_embedding`, and their errors. Images on the tiny SD-shaped pipeline
(2 steps, 64 x 64), token shapes on the shipped miniature (16 identity tokens per embedding)."""

import numpy as np
import pytest
import torch

from instantid_lab.errors import InputError
from instantid_lab.keypoints import draw_kps
from instantid_lab.pipeline import References
from instantid_lab.pipeline.inputs import as_identity_embeddings, as_reference_sets
from instantid_lab.pipeline.records import BatchGeometry
from instantid_lab.references import (COMBINERS, combine_references, face_weights, identity_tokens,
                                      normalised_weights)
from instantid_lab.tiny import TINY_KPS, TINY_PROMPT, tiny_embedding, tiny_pipeline

AVERAGING = ("mean", "norm_mean", "weighted")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd", seed=0)


@pytest.fixture(scope="module")
def kps_image():
    return draw_kps(np.array(TINY_KPS, np.float32), (64, 64))


@pytest.fixture(scope="module")
def refs():
    """Four different reference embeddings [4, 16] of norms 16..22 (raw antelopev2-like)."""
    return torch.stack([tiny_embedding(16, seed=s, norm=16.0 + 2 * s) for s in range(4)])


def run(pipe, kps_image, face_embedding, prompt=TINY_PROMPT, **kw):
    args = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    return pipe(prompt, face_embedding, kps_image, **{**args, **kw}).images


@pytest.mark.parametrize("combine", COMBINERS)
def test_n_copies_of_one_embedding_give_that_embeddings_image_with_every_combiner(pipe, kps_image, refs, combine):
    """Averaging N copies returns the copy. "concat" keeps 3 x Q tokens, but attention over duplicated keys
    equals attention over one copy: each copy's softmax weight is 1/3 of the single key's, and the three
    identical values sum back to it (also for the negative identity, R(0) repeated)."""
    single = run(pipe, kps_image, refs[0])
    copies = References(refs[0].repeat(3, 1), combine=combine)
    np.testing.assert_allclose(run(pipe, kps_image, copies), single, atol=1e-5)


@pytest.mark.parametrize("combine", AVERAGING)
def test_reordering_the_references_changes_nothing(pipe, kps_image, refs, combine):
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0]) if combine == "weighted" else None
    order = torch.tensor([2, 0, 3, 1])
    reordered = None if weights is None else weights[order]
    a = run(pipe, kps_image, References(refs, combine, weights))
    b = run(pipe, kps_image, References(refs[order], combine, reordered))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_weighted_with_one_weight_one_and_the_rest_zero_is_that_reference_alone(pipe, kps_image, refs):
    alone = run(pipe, kps_image, refs[2])
    picked = run(pipe, kps_image, References(refs, "weighted", weights=[0.0, 0.0, 1.0, 0.0]))
    np.testing.assert_allclose(picked, alone, atol=1e-5)
    assert np.abs(run(pipe, kps_image, References(refs, "mean")) - alone).max() > 1e-3   # the others did count


def test_the_combiners_are_their_equations(refs):
    w = torch.tensor([1.0, 0.0, 3.0, 4.0])
    unit_mean = (refs / refs.norm(dim=1, keepdim=True)).mean(0)
    expected = {"mean": refs.mean(0), "weighted": (w[:, None] * refs).sum(0) / w.sum(),
                "norm_mean": unit_mean / unit_mean.norm() * refs.norm(dim=1).mean()}
    for combine, want in expected.items():
        got = combine_references(refs, combine, w if combine == "weighted" else None)
        torch.testing.assert_close(got, want[None], atol=1e-5, rtol=1e-5)
    assert torch.equal(combine_references(refs, "concat"), refs)
    assert torch.equal(normalised_weights([2, 2], 2), torch.tensor([0.5, 0.5]))


def test_a_plain_array_with_reference_mode_equals_the_record(pipe, kps_image, refs):
    for mode in ("mean", "norm_mean", "concat"):
        np.testing.assert_allclose(run(pipe, kps_image, refs.numpy(), reference_mode=mode),
                                   run(pipe, kps_image, References(refs, mode)), atol=1e-6)


def test_concat_references_per_prompt_in_one_batch_equal_separate_runs(pipe, kps_image, refs):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    people = [References(refs[:2], "concat"), References(refs[2:], "concat")]
    batch = run(pipe, kps_image, people, prompt=[TINY_PROMPT] * 2, latents=noise)
    for k in range(2):
        np.testing.assert_allclose(batch[k], run(pipe, kps_image, people[k], latents=noise[k : k + 1])[0], atol=1e-5)


def test_concat_gives_n_times_16_identity_tokens_and_a_repeated_zero_negative():
    from instantid_lab.worlds import load_pipeline

    mini = load_pipeline("miniature")
    q, c, refs = mini.image_proj.config.num_queries, mini.unet.config.cross_attention_dim, torch.randn(3, 64)
    assert q == 16
    tokens = mini.encode_identity(References(refs, "concat"), BatchGeometry(2, 1, 32, 32, guided=True))
    assert tokens.shape == (4, 3 * 16, c)                                 # [2B, N * 16, C], [uncond, cond]
    with torch.no_grad():
        zero = mini.image_proj(torch.zeros(1, 64))                        # [1, 16, C]
        torch.testing.assert_close(tokens[:2], zero.repeat(2, 3, 1))      # R(0) repeated N times
        torch.testing.assert_close(tokens[3, 16:32], mini.image_proj(refs[1:2])[0])   # reference 2's tokens
        assert identity_tokens(mini.image_proj, refs[None]).shape == (1, 48, c)


def test_face_weights_come_from_box_areas_or_detection_scores(make_face):
    faces = [make_face(0, 0, 10, np.ones(3)), make_face(5, 5, 20, np.ones(3))]
    assert face_weights(faces).tolist() == [100.0, 400.0]
    assert face_weights(faces, by="det_score").tolist() == pytest.approx([0.99, 0.99])
    with pytest.raises(InputError, match="area"):
        face_weights(faces, by="size")


# ----------------------------------------------------------------------------- errors


def test_an_unknown_combiner_names_the_argument_and_the_valid_values(pipe, kps_image, refs):
    with pytest.raises(InputError, match=r"References.combine must be one of .*'mean'.*'concat'.*'median'"):
        References(refs, "median")
    with pytest.raises(InputError, match=r"reference_mode must be one of .*'norm_mean'.*'weighted'"):
        run(pipe, kps_image, refs, reference_mode="median")


@pytest.mark.parametrize("weights, message", [
    ([1.0, float("nan"), 1.0, 1.0], "NaN"), ([1.0, -1.0, 1.0, 1.0], ">= 0"), ([0.0] * 4, "positive sum"),
    ([1.0, 1.0], "one number per reference"),
])
def test_bad_weights_are_input_errors(refs, weights, message):
    with pytest.raises(InputError, match=message):
        References(refs, "weighted", weights)


def test_bad_embeddings_and_misplaced_weights_are_input_errors(pipe, kps_image, refs):
    broken = refs.clone()
    broken[1, 3] = float("inf")
    with pytest.raises(InputError, match="NaN or infinite"):
        References(broken)
    with pytest.raises(InputError, match="NaN or infinite"):
        run(pipe, kps_image, torch.full((16,), float("nan")))
    with pytest.raises(InputError, match="combine='weighted'"):
        References(refs, "mean", weights=[1, 2, 3, 4])
    with pytest.raises(InputError, match=r"\[N, D\]"):
        References(torch.zeros(2, 3, 16))


def test_concat_needs_the_same_number_of_references_for_every_prompt(pipe, kps_image, refs):
    people = [References(refs[:2], "concat"), References(refs[:3], "concat")]
    with pytest.raises(InputError, match=r"same number of references N; got N in \[2, 3\]"):
        run(pipe, kps_image, people, prompt=[TINY_PROMPT] * 2)
    with pytest.raises(InputError, match="as_reference_sets"):
        as_identity_embeddings(References(refs, "concat"), 1, 16)
    assert as_reference_sets([References(refs[:2], "concat"), References(refs, "mean")][:1], 2, 16).shape == (2, 2, 16)


# ----------------------------------------------------------------------------- the study (experiments.multireference)


def test_the_study_gives_one_scored_row_per_image_and_paired_gains():
    from instantid_lab.experiments import multireference as mr
    from instantid_lab.experiments.metrics import MiniatureScorer
    from instantid_lab.face_analysis import get_face_analyzer
    from instantid_lab.worlds import load_pipeline

    mini = load_pipeline("miniature")
    mini.set_progress_bar_config(disable=True)
    settings = mr.StudySettings.ci(n_identities=2, seeds=(0,), n_references=(1, 2), steps=2)
    subjects = mr.miniature_subjects(get_face_analyzer("miniature"), settings)
    result = mr.run_study(mini, subjects, MiniatureScorer(), settings)
    t = result.table
    assert len(t) == len(result.images) == 2 * (1 + len(COMBINERS))     # N = 1 once, then every combiner at N = 2
    assert set(t.combiner) == {mr.SINGLE, *COMBINERS} and t.identity_similarity.notna().all()
    gain = mr.gains(t)
    mean_2 = t[(t.combiner == "mean") & (t.n_references == 2)].identity_similarity.to_numpy()
    single = t[t.combiner == mr.SINGLE].identity_similarity.to_numpy()
    assert gain.set_index("combiner").loc["mean", "gain_mean"] == pytest.approx((mean_2 - single).mean())
    assert len(mr.quote_table(t)) == 1 + len(COMBINERS)
    columns = mr.example_columns(result, n_subjects=2)
    assert len(columns) == 2 + 1 + 1 + len(COMBINERS)                     # references, target, single, combiners


def test_two_processes_share_the_study_cells_and_return_the_table_of_one_process(tmp_path):
    """`torchrun --nproc_per_node 2`: cell k goes to process k mod 2; the images are gathered before scoring."""
    import os
    import subprocess
    import sys

    script = tmp_path / "study.py"
    script.write_text(
        "import sys\n"
        "from instantid_lab.experiments.metrics import MiniatureScorer\n"
        "from instantid_lab.experiments.multireference import StudySettings, miniature_subjects, run_study\n"
        "from instantid_lab.face_analysis import get_face_analyzer\n"
        "from instantid_lab.miniature.training.loop import is_main_process\n"
        "from instantid_lab.worlds import load_pipeline\n"
        "settings = StudySettings(n_identities=2, seeds=(0,), n_references=(1, 2), steps=2)\n"
        "pipe = load_pipeline('miniature'); pipe.set_progress_bar_config(disable=True)\n"
        "result = run_study(pipe, miniature_subjects(get_face_analyzer('miniature'), settings), MiniatureScorer(), settings)\n"
        "if is_main_process():\n"
        "    result.table.to_csv(sys.argv[1], index=False)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    for command, out in (([sys.executable], "one.csv"), ([torchrun, "--nproc_per_node", "2"], "two.csv")):
        done = subprocess.run([*command, str(script), str(tmp_path / out)], capture_output=True, text=True,
                              timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = ((tmp_path / name).read_text() for name in ("one.csv", "two.csv"))
    assert one == two and len(one.splitlines()) == 1 + 2 * 5  # header + 2 subjects x (single + 4 combiners at N=2)
