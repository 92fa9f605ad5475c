"""Conditional models, predictor(z, t, c): the likelihood of class-conditional Gaussians against
their closed form, sampling under a context, the loss and bound of a batch of contexts against
the conditioned model's, bad contexts, and class-conditional training from a labelled .npz
through the command line (digits)."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from gaussian_oracle import FORWARDS, gaussian_data, gaussian_log_prob, path_coefficients
from typer.testing import CliRunner

import nfdm_de as nd
from nfdm_de.cli.main import app

ORACLE_TOL = 1e-4  # nats, as the unconditional oracle (docs/math.md, "Accuracy checks")
runner = CliRunner()


class ClassPosteriorMean(eqx.Module):
    """A user-written conditional predictor: E[x | z_t = z, c] for x | c ~ N(means[c], cov)."""

    forward: nd.AbstractGaussianForwardProcess
    means: jnp.ndarray
    cov: jnp.ndarray

    def example_context(self):
        return jnp.zeros((), jnp.int32)

    def __call__(self, z, t, c):
        t = jnp.asarray(t, z.dtype)
        a, s = path_coefficients(self.forward, t, z.shape[0])
        mean = self.means[c]
        marginal = a**2 * self.cov + s**2 * jnp.eye(z.shape[0], dtype=z.dtype)
        return mean + a * self.cov @ jnp.linalg.solve(marginal, z - a * mean)


def _oracle(getkey, dim=3, classes=3, forward="linear"):
    _, cov = gaussian_data(getkey(), dim)
    means = 3.0 * jr.normal(getkey(), (classes, dim), jnp.float64)
    process = FORWARDS[forward]()
    model = nd.NFDM(
        process, ClassPosteriorMean(process, means, cov), nd.ZeroVolatility(), data_shape=(dim,)
    )
    return model, means, cov + process.delta**2 * jnp.eye(dim)


@pytest.mark.parametrize("forward", ["linear", "vp"])
def test_conditional_likelihood_matches_closed_form(forward, getkey):
    model, means, marginal_cov = _oracle(getkey, forward=forward)
    labels = jnp.array([0, 1, 2, 0, 2, 1, 1, 0])
    x = means[labels] + jr.multivariate_normal(getkey(), jnp.zeros(3), marginal_cov, (8,))
    estimate, _ = nd.log_likelihood(model, x, context=labels, rtol=1e-7, atol=1e-7)
    expected = [
        gaussian_log_prob(x[i : i + 1], means[c], marginal_cov)[0] for i, c in enumerate(labels)
    ]
    assert np.max(np.abs(np.asarray(estimate.value) - np.array(expected))) <= ORACLE_TOL
    # The same examples under the wrong class are far less likely: the context is used.
    wrong, _ = nd.log_likelihood(model, x, context=(labels + 1) % 3, rtol=1e-7, atol=1e-7)
    assert np.all(np.asarray(wrong.value) < np.asarray(estimate.value) - 1.0)
    # Per-example solves and chunked solves carry the contexts with their rows.
    for options in (dict(per_example=True), dict(num_chunks=2)):
        again, _ = nd.log_likelihood(model, x, context=labels, rtol=1e-7, atol=1e-7, **options)
        assert np.max(np.abs(np.asarray(again.value) - np.array(expected))) <= ORACLE_TOL


def test_conditional_samples_follow_their_class(getkey):
    model, means, marginal_cov = _oracle(getkey)
    num = 400
    for label in (0, 2):
        samples, _ = nd.sample(model, num, key=getkey(), context=jnp.asarray(label))
        stderr = np.sqrt(np.diag(np.asarray(marginal_cov)) / num)
        assert np.all(np.abs(np.asarray(samples.mean(0) - means[label])) < 4 * stderr)
    with pytest.raises(ValueError, match="conditional: pass the `context`"):
        nd.sample(model, 4, key=getkey())


def test_batch_of_contexts_is_the_conditioned_model(getkey):
    """loss and variational_bound with one context per example equal those of the model
    conditioned on that context (the same keys), so the batch path adds nothing of its own."""
    dim = 4
    predictor = nd.mlp_predictor(dim, num_classes=5, width=16, depth=1, key=getkey())
    model = nd.NFDM(nd.VariancePreserving(), predictor, nd.ConstantVolatility(1.0))
    x = jr.normal(getkey(), (6, dim))
    labels = jnp.full((6,), 3, jnp.int32)
    key = getkey()
    conditioned = model.conditioned(jnp.asarray(3, jnp.int32))
    batch, _ = nd.loss(model, x, key=key, context=labels)
    single, _ = nd.loss(conditioned, x, key=key)
    assert float(batch) == pytest.approx(float(single), rel=1e-12)
    bound, _ = nd.variational_bound(model, x, key=key, context=labels, num_samples=8)
    alone, _ = nd.variational_bound(conditioned, x, key=key, num_samples=8)
    np.testing.assert_allclose(np.asarray(bound.value), np.asarray(alone.value), rtol=1e-12)
    # Another class gives another loss: the embedding reaches the network.
    other, _ = nd.loss(model, x, key=key, context=labels - 1)
    assert float(other) != float(batch)


def test_vector_contexts(getkey):
    dim = 3
    predictor = nd.mlp_predictor(dim, context_size=2, width=16, depth=1, key=getkey())
    model = nd.NFDM(nd.LinearInterpolant(), predictor, nd.ZeroVolatility())
    x = jr.normal(getkey(), (5, dim))
    context = jr.normal(getkey(), (5, 2))
    estimate, _ = nd.log_likelihood(model, x, context=context)
    assert np.all(np.isfinite(np.asarray(estimate.value)))
    with pytest.raises(ValueError, match=r"\(5, 2\); got \(5, 3\)"):
        nd.log_likelihood(model, x, context=jnp.zeros((5, 3)))


def test_bad_contexts_are_clear_errors(getkey):
    dim = 2
    predictor = nd.mlp_predictor(dim, num_classes=4, width=8, depth=1, key=getkey())
    model = nd.NFDM(nd.LinearInterpolant(), predictor, nd.ZeroVolatility())
    plain = nd.NFDM(
        nd.LinearInterpolant(),
        nd.mlp_predictor(dim, width=8, depth=1, key=getkey()),
        nd.ZeroVolatility(),
    )
    x = jnp.zeros((3, dim))
    key = getkey()
    with pytest.raises(ValueError, match="one context per example"):
        nd.loss(model, x, key=key)
    with pytest.raises(ValueError, match="shape \\(\\) per example, \\(3,\\); got \\(3, 2\\)"):
        nd.loss(model, x, key=key, context=jnp.zeros((3, 2), jnp.int32))
    with pytest.raises(ValueError, match="class labels are integers"):
        nd.loss(model, x, key=key, context=jnp.zeros((3,)))
    with pytest.raises(ValueError, match="unconditional"):
        nd.loss(plain, x, key=key, context=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="unconditional"):
        plain.conditioned(jnp.asarray(0))
    with pytest.raises(ValueError, match="already conditioned"):
        nd.loss(model.conditioned(jnp.asarray(1)), x, key=key, context=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="exactly one of"):
        nd.ContextMLP(dim, num_classes=3, context_size=2, key=key)


def _labelled_eight_gaussians(tmp_path):
    """eight-gaussians in three classes by angle: a labelled training file and a labelled
    evaluation file of its first 100 rows."""
    x = nd.load_dataset("eight-gaussians", num=1024)
    labels = (np.floor((np.arctan2(x[:, 1], x[:, 0]) + np.pi) / (2 * np.pi / 3)) % 3).astype(int)
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    np.savez(train, x=x, labels=labels)
    np.savez(test, x=x[:100], labels=labels[:100])
    return train, test


def test_labelled_training_resumes_exactly(tmp_path):
    """A labelled run with its likelihood phase, stopped and resumed, ends bit-identical to the
    run that never stopped."""
    data, _ = _labelled_eight_gaussians(tmp_path)
    model = nd.ModelConfig(width=16, depth=1)
    config = nd.TrainConfig(
        data=str(data), steps=12, batch_size=32, model=model, likelihood_steps=2, save_every=7
    )
    nd.train(config, tmp_path / "straight")
    nd.train(config, tmp_path / "resumed", stop_at=7)
    nd.train(config, tmp_path / "resumed", resume=True)
    straight, resumed = nd.load_run(tmp_path / "straight"), nd.load_run(tmp_path / "resumed")
    assert straight.config.model.num_classes == 3 and straight.model.is_conditional
    for a, b in zip(jax.tree.leaves(straight.model), jax.tree.leaves(resumed.model), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _digits_files(tmp_path):
    x, labels = nd.digits_split("train")
    train = tmp_path / "train.npz"
    np.savez(train, x=x, labels=labels)
    return train


def test_cli_class_conditional_round_trip(tmp_path):
    """train on a labelled .npz, sample one class, score labelled points; and the errors for a
    missing or impossible label and for unlabelled data. The same run settings as the resume
    test above, so the compiled steps are shared."""
    train, test = _labelled_eight_gaussians(tmp_path)
    run = tmp_path / "run"
    tiny = ["--steps", "20", "--batch-size", "32", "--width", "16", "--depth", "1"]
    result = runner.invoke(
        app,
        ["train", "--data", str(train), "--run-dir", str(run), *tiny, "--likelihood-steps", "2"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["model"]["num_classes"] == 3

    sample = ["sample", "--run-dir", str(run), "--num", "8", "--solver-steps", "4", "--json"]
    result = runner.invoke(app, [*sample, "--label", "2", "--plot", str(tmp_path / "two.png")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["label"] == 2 and (tmp_path / "two.png").stat().st_size
    for extra, message in (([], "give --label K"), (["--label", "3"], "in \\[0, 3\\)")):
        result = runner.invoke(app, [*sample, *extra])
        assert result.exit_code == 1
        assert json.loads(result.stdout)["error"]
        assert message.replace("\\", "") in result.stderr

    nll = ["nll", "--run-dir", str(run), "--method", "both", "--rtol", "1e-3", "--atol", "1e-3"]
    nll.append("--json")
    result = runner.invoke(app, [*nll, "--data", str(test)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["conditional"] is True
    assert np.isfinite(summary["nll_ode"]) and np.isfinite(summary["nll_bound"])
    result = runner.invoke(app, [*nll, "--data", "eight-gaussians", "--num", "50"])  # no labels
    assert result.exit_code == 1 and "give data with labels" in result.stderr


def test_bad_labels_are_one_line_errors(tmp_path):
    x, labels = nd.digits_split("test")
    cases = {
        "negative": (x, np.where(labels == 0, -1, labels)),
        "fractional": (x, labels + 0.5),
        "too few": (x, labels[:-3]),
    }
    for name, (data, bad) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.npz"
        np.savez(path, x=data, labels=bad)
        run = tmp_path / f"run_{name.replace(' ', '_')}"
        result = runner.invoke(
            app, ["train", "--data", str(path), "--run-dir", str(run), "--steps", "2"]
        )
        assert result.exit_code == 1, name
        assert result.stderr.startswith("error: the labels of") and not run.exists()


@pytest.mark.slow
def test_class_conditional_digits_are_recognisable(tmp_path):
    """After 1,500 steps on the digits with labels, a classifier fitted on the real training
    digits assigns most class-k samples to class k (chance: 10%)."""
    from sklearn.linear_model import LogisticRegression

    train = _digits_files(tmp_path)
    config = nd.TrainConfig(data=str(train), steps=1500, likelihood_steps=0)
    nd.train(config, tmp_path / "run")
    run = nd.load_run(tmp_path / "run")
    assert isinstance(run.model, nd.NFDM)
    x, labels = nd.digits_split("train")
    classifier = LogisticRegression(max_iter=2000).fit(x, labels)
    hits = []
    for label in range(10):
        z, _ = nd.sample(run.model, 20, key=jr.key(label), context=jnp.asarray(label), steps=32)
        hits.append(np.mean(classifier.predict(np.asarray(run.to_data_units(z))) == label))
    assert np.mean(hits) > 0.7, hits
