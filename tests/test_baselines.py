"""LDP sparse regression (Zhu et al. 2024) and DP-KDE classification (Backurs et al. 2024):
noise against sensitivity, one release per client, and the estimators where the answer is known."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from scipy.stats import norm

from fedsim.core.config import build_scenario
from fedsim.core.errors import UserError
from fedsim.data.datasets import SparseRegression
from fedsim.defenses import dp_kde, ldp_sparse_regression as ldp, one_release
from fedsim.federation.client_call import ClientCall, client_setup


def gaussian_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
    """Balle & Wang's exact delta of the Gaussian mechanism, from scipy's normal cdf."""
    a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    return norm.cdf(a - b) - math.exp(epsilon) * norm.cdf(-a - b)


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 8.0])
def test_analytic_gaussian_is_tight(epsilon: float) -> None:
    sigma = ldp.analytic_gaussian_sigma(3.0, epsilon, 1e-5)
    assert gaussian_delta(sigma, 3.0, epsilon) <= 1e-5 * (1 + 1e-6)
    assert gaussian_delta(sigma * 0.99, 3.0, epsilon) > 1e-5  # no slack: smallest such sigma
    if epsilon < 1:  # the classic calibration is valid there, and never tighter
        assert sigma <= 3.0 * math.sqrt(2 * math.log(1.25 / 1e-5)) / epsilon


def test_ldp_noise_matches_sensitivity() -> None:
    params = ldp.LdpSparseRegressionParams(epsilon=2.0, delta=1e-5, clip_x=1.5, clip_y=0.5)
    s_a, s_c = ldp.noise_scales(params, dim=4, examples=1)
    # ||x~ x~^T||_F <= d tau_x^2 and ||x~ y~|| <= sqrt(d) tau_x tau_y; replace-one doubles them
    assert s_a == pytest.approx(ldp.analytic_gaussian_sigma(2 * 4 * 1.5**2, 1.0, 5e-6))
    assert s_c == pytest.approx(ldp.analytic_gaussian_sigma(2 * 2 * 1.5 * 0.5, 1.0, 5e-6))
    # the worst pair of inputs really is that far apart (all coordinates at +-tau)
    x = torch.full((1, 4), 1.5)
    xx1, xy1 = ldp.truncated_sums(x * 3, torch.tensor([9.0]), params)
    _, xy2 = ldp.truncated_sums(x, torch.tensor([-9.0]), params)
    assert float((xy1 - xy2).norm()) == pytest.approx(2 * 2 * 1.5 * 0.5)
    assert float(xx1.norm()) == pytest.approx(4 * 1.5**2)
    # the released noise has that std (symmetric matrix: upper triangle iid)
    generator = torch.Generator().manual_seed(0)
    noise = ldp.symmetric_noise(200, 2.0, generator)
    assert torch.equal(noise, noise.T)
    assert float(noise[torch.triu_indices(200, 200)[0], torch.triu_indices(200, 200)[1]].std()) == pytest.approx(2.0, rel=0.02)


def test_estimator_recovers_theta_without_noise() -> None:
    data_params = SparseRegression.Params(num_examples=400, features=8, sparsity=2, noise=0.0)
    data, theta = SparseRegression.load(data_params, 3), SparseRegression.theta(data_params, 3).double()
    params = ldp.LdpSparseRegressionParams(sparsity=2, clip_x=100.0, clip_y=100.0, eigen_floor=1e-6)
    xx, xy = ldp.truncated_sums(data.x, data.y, params)  # the noiseless limit of the messages
    estimate = ldp.estimate(xx, xy, len(data), 2, 1e-6)
    assert torch.allclose(estimate, theta, atol=1e-5)
    assert int((estimate != 0).sum()) == 2


def test_pooled_messages_match_per_client_sum() -> None:
    x, y = torch.randn(300, 3), torch.randn(300)
    params = ldp.LdpSparseRegressionParams(epsilon=1.0)
    generator = torch.Generator().manual_seed(1)
    per_client = [ldp.private_message(x[i : i + 1], y[i : i + 1], params, generator)[1] for i in range(300)]
    pooled = [ldp.pooled_messages(x, y, params, generator)[1] for _ in range(300)]
    s_c = ldp.noise_scales(params, 3, 1)[1]
    exact = ldp.truncated_sums(x, y, params)[1]
    per_client_noise = torch.stack(per_client).sum(0) - exact  # one draw of the summed noise
    pooled_std = float((torch.stack(pooled) - exact).std())
    assert pooled_std == pytest.approx(math.sqrt(300) * s_c, rel=0.1)
    assert float(per_client_noise.abs().max()) < 5 * math.sqrt(300) * s_c


def call_for(scenario: dict, state: RecordDict, partition: int = 0) -> ClientCall:
    setup = client_setup(build_scenario(scenario).to_yaml())
    return ClientCall(setup, partition, secret=7, server_round=1, config=ConfigRecord({}), state=state)


LDP_SCENARIO = {
    "name": "t",
    "data": {"dataset": {"name": "sparse_regression", "num_examples": 50, "features": 4}, "num_clients": 40, "val_fraction": 0.0},
    "model": {"name": "mlp", "hidden": []},
    "federation": {"strategy": {"name": "ldp_sparse_regression", "epsilon": 3.0}, "rounds": 1},
    "observer": {"rounds": "none"},
}
KDE_SCENARIO = {
    "name": "t",
    "data": {"dataset": "digits", "num_clients": 4, "val_fraction": 0.0},
    "model": {"name": "kde", "features": 64},
    "federation": {"strategy": {"name": "dp_kde", "epsilon": 2.0}, "rounds": 1},
    "observer": {"rounds": "none"},
}


@pytest.mark.parametrize(("scenario", "action"), [
    (LDP_SCENARIO, ldp.release),
    (KDE_SCENARIO, dp_kde.release),
])
def test_one_release_per_client(scenario: dict, action) -> None:
    state = RecordDict()
    setup = call_for(scenario, state).setup
    content = RecordDict({"arrays": ArrayRecord(setup.new_model().state_dict()), "config": ConfigRecord({"release-cohort": 4})})
    reply = action(content, call_for(scenario, state))
    assert "arrays" in reply
    with pytest.raises(one_release.AlreadyReleased):
        action(content, call_for(scenario, state))  # the same node, asked again


def test_servers_ask_each_node_once(monkeypatch: pytest.MonkeyPatch) -> None:
    class Nodes:
        def get_node_ids(self) -> list[int]:
            return [11, 12, 13]

    # a Message outside a Flower run: just its destination
    monkeypatch.setattr(one_release, "Message", lambda content, dst_node_id, message_type: dst_node_id)
    for server in (ldp.LdpSparseRegressionServer(ldp.LdpSparseRegressionParams()), dp_kde.DpKdeServer(dp_kde.DpKdeParams())):
        assert sorted(server.configure_train(1, ArrayRecord(), ConfigRecord({}), Nodes())) == [11, 12, 13]
        assert server.configure_train(2, ArrayRecord(), ConfigRecord({}), Nodes()) == []


def test_ldp_privacy_unit_is_local() -> None:
    from fedsim.core.privacy import Claim

    unit = ldp.LdpSparseRegressionServer(ldp.LdpSparseRegressionParams()).privacy_unit()
    assert Claim("ldp_sparse_regression", f"max_client_{unit.metric}", unit).kind == "local"
    kde_unit = dp_kde.DpKdeServer(dp_kde.DpKdeParams()).privacy_unit()
    assert Claim("dp_kde", f"max_client_{kde_unit.metric}", kde_unit).kind == "example"


def kde_model(features: int = 4000, bandwidth: float = 1.5) -> dp_kde.KdeClassifier:
    torch.manual_seed(0)
    return dp_kde.KdeClassifier(dp_kde.KdeClassifier.Params(features=features, bandwidth=bandwidth), (3,), 2)


def test_feature_map_has_unit_norm_so_sensitivity_is_sqrt2() -> None:
    model = kde_model(features=100)
    rows = model.feature_map(torch.randn(50, 3) * 5)
    assert torch.allclose(rows.norm(dim=1), torch.ones(50), atol=1e-5)
    assert model.sensitivity() == (pytest.approx(math.sqrt(2)), pytest.approx(math.sqrt(100) + 1))
    params = dp_kde.DpKdeParams(epsilon=1.0, delta=1e-5)
    assert dp_kde.noise_scale(params, model.sensitivity()) == pytest.approx(ldp.analytic_gaussian_sigma(math.sqrt(2), 1.0, 1e-5))
    laplace = dp_kde.DpKdeParams(epsilon=0.5, mechanism="laplace")
    assert float(rows.abs().sum(1).max()) + 1 <= dp_kde.noise_scale(laplace, model.sensitivity()) * 0.5 + 1e-6
    # the noise actually drawn has the calibrated scale (Laplace: std = sqrt(2) b)
    x, y = torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)
    big = dp_kde.KdeClassifier(dp_kde.KdeClassifier.Params(features=20000), (3,), 2)
    generator = torch.Generator().manual_seed(0)
    for p in (params, laplace):
        drawn = dp_kde.private_sketch(big, x, y, 2, p, big.sensitivity(), generator)
        expected = dp_kde.noise_scale(p, big.sensitivity()) * (math.sqrt(2) if p.mechanism == "laplace" else 1)
        assert float(drawn.std()) == pytest.approx(expected, rel=0.03)


def test_kde_sketch_matches_exact_kernel_sum() -> None:
    model = kde_model()
    x = torch.randn(30, 3)
    y = torch.tensor([0] * 10 + [1] * 20)
    queries = torch.randn(5, 3)
    model.sketch.copy_(dp_kde.class_sums(model, x, y, 2))
    exact = torch.exp(-torch.cdist(queries, x) ** 2 / 1.5**2)
    averages = torch.stack([exact[:, y == c].mean(1) for c in (0, 1)], 1)
    assert torch.allclose(model(queries), averages, atol=0.05)  # RFF error ~ 1/sqrt(D/2)
    assert torch.equal(model.sketch[:, -1], torch.tensor([10.0, 20.0]))


def test_kde_never_predicts_a_class_whose_count_is_noise() -> None:
    model = kde_model()
    x = torch.randn(40, 3)
    model.sketch.copy_(dp_kde.class_sums(model, x, torch.zeros(40, dtype=torch.long), 2))
    model.sketch[1] = torch.randn(model.sketch.shape[1]) * 5  # an empty class: noise only
    model.sketch[1, -1] = 2.0  # its noised count, below the server's threshold
    model.min_count.fill_(6.0)
    assert torch.equal(model(torch.randn(20, 3)).argmax(1), torch.zeros(20, dtype=torch.long))


def test_dp_kde_federation_reports_accuracy_and_its_epsilon(tmp_path) -> None:
    from fedsim.core.results import RunDirectory
    from fedsim.federation.simulation import run_federation

    scenario = build_scenario({**KDE_SCENARIO, "federation": {"strategy": {"name": "dp_kde", "epsilon": 8.0}, "rounds": 2}})
    run = RunDirectory(tmp_path)
    run_federation(scenario, run)
    records = list(run.metrics())
    assert records[-1]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert len(records[1]["clients"]) == 4 and records[2]["clients"] == []  # round 2 asks nobody
    (entry,) = records[-1]["privacy"]
    assert (entry["key"], entry["epsilon"], entry["kind"]) == ("max_client_kde_epsilon", 8.0, "example")


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_secure_noise_shares_sum_to_the_full_noise(mechanism: str) -> None:
    params = dp_kde.DpKdeParams(epsilon=1.0, mechanism=mechanism)
    generator = torch.Generator().manual_seed(0)
    shape = torch.Size([200_000])
    total = sum(dp_kde.noise_share(shape, params, 2.0, 5, generator) for _ in range(5))
    full = dp_kde.noise_share(shape, params, 2.0, 1, generator)
    one = dp_kde.noise_share(shape, params, 2.0, 5, generator)
    expected_std = 2.0 * (math.sqrt(2) if mechanism == "laplace" else 1)
    for noise in (total, full):  # the sum of 5 shares is the mechanism's noise: same std, same tails
        assert float(noise.std()) == pytest.approx(expected_std, rel=0.02)
        kurtosis = float(((noise - noise.mean()) ** 4).mean() / noise.var() ** 2)
        assert kurtosis == pytest.approx(6.0 if mechanism == "laplace" else 3.0, rel=0.1)
    assert float(one.std()) == pytest.approx(expected_std / math.sqrt(5), rel=0.02)  # one share alone: less


def test_laplace_noise_is_finite_at_the_uniform_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    params = dp_kde.DpKdeParams(mechanism="laplace")
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None: torch.zeros(shape))  # the edge draw
    noise = dp_kde.noise_share(torch.Size([3]), params, 2.0, 1, torch.Generator())
    eps = torch.finfo(torch.float32).eps
    assert torch.allclose(noise, torch.full((3,), 2.0 * math.log(eps)), rtol=1e-3)  # -31.9, not -inf


def test_pca_map_is_fitted_on_public_examples() -> None:
    torch.manual_seed(0)
    axis = torch.tensor([0.6, 0.8, 0.0])
    public = torch.randn(500, 1) * 3 * axis + torch.randn(500, 3) * 0.01 + torch.tensor([1.0, 2.0, 3.0])
    params = dp_kde.KdeClassifier.Params(features=64, pca=1)
    model = dp_kde.KdeClassifier(params, (3,), 2)
    model.fit_public(public)
    assert torch.allclose(model.pca_mean, torch.tensor([1.0, 2.0, 3.0]), atol=0.3)
    assert torch.allclose(model.pca_components[0].abs(), axis, atol=0.01)
    with pytest.raises(UserError, match="data.public_classes"):
        dp_kde.KdeClassifier(params, (3,), 2).fit_public(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="at most one"):
        dp_kde.KdeClassifier.Params(projection=2, pca=2)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_pca_without_public_classes_is_refused_before_any_run(tmp_path, command: str) -> None:
    from cli_helpers import run_cli

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**KDE_SCENARIO, "model": {"name": "kde", "features": 64, "pca": 8}}))
    code, out, err = run_cli(command, path, "--set", f"output.dir={tmp_path / 'runs'}")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "model.pca=8" in err and "data.public_classes" in err and "drop model.pca" in err
    assert not (tmp_path / "runs").exists()


def test_secure_pca_federation_sums_shares(tmp_path) -> None:
    from fedsim.core.results import RunDirectory
    from fedsim.federation.simulation import run_federation

    spec = {
        **KDE_SCENARIO,
        "data": {**KDE_SCENARIO["data"], "public_classes": [8, 9]},
        "model": {"name": "kde", "features": 64, "pca": 8},
        "federation": {"strategy": {"name": "dp_kde", "epsilon": 8.0, "aggregation": "secure"}, "rounds": 1},
    }
    run = RunDirectory(tmp_path)
    run_federation(build_scenario(spec), run)
    (record,) = list(run.metrics())[-1:]
    assert record["test_accuracy"] > 0.5  # 8 private classes: chance is 0.125
    (entry,) = record["privacy"]
    assert (entry["epsilon"], entry["kind"]) == (8.0, "example")
    assert "of the sum only (SecAgg+)" in dp_kde.DpKdeServer(dp_kde.DpKdeParams(aggregation="secure")).privacy_unit().accountant


def distance_model(metric: str, dims: int = 3, **params) -> "DistanceClassifier":
    from fedsim.defenses.dp_distance import DistanceClassifier

    torch.manual_seed(0)
    return DistanceClassifier(DistanceClassifier.Params(metric=metric, **params), (dims,), 2)


def exact_distance_sums(x: torch.Tensor, y: torch.Tensor, queries: torch.Tensor, p: float, square: bool = False) -> torch.Tensor:
    """(B, 2): sum over each class's examples of ||x - q||_p (squared for l2sq), no structure."""
    dist = torch.cdist(queries.double(), x.double(), p=p)
    dist = dist**2 if square else dist
    return torch.stack([dist[:, y == c].sum(1) for c in (0, 1)], 1)


def test_l1_distance_tree_answers_the_exact_sum_within_the_leaf_width() -> None:
    torch.manual_seed(1)
    levels, dims = 6, 3
    model = distance_model("l1", dims, levels=levels, low=-2.0, high=2.0)
    x, queries = torch.rand(40, dims) * 4 - 2, torch.rand(25, dims) * 4 - 2
    y = torch.tensor([0] * 15 + [1] * 25)
    model.sketch.copy_(dp_kde.class_sums(model, x, y, 2))
    answer, exact = model.similarity_sums(queries).double(), exact_distance_sums(x, y, queries, 1.0)
    # only examples sharing a leaf with the query are approximated, each by at most w * range
    bound = 40 * dims * 4.0 / 2**levels
    assert float((answer - exact).abs().max()) <= bound
    assert float((answer - exact).abs().mean()) < bound / 10  # and most coordinates share no leaf
    assert torch.equal(model.sketch[:, -1], torch.tensor([15.0, 25.0]))


def test_l2sq_distance_sketch_is_exact_and_l2_within_projection_error() -> None:
    torch.manual_seed(2)
    x, queries = torch.rand(30, 5), torch.rand(10, 5)
    y = torch.tensor([0] * 10 + [1] * 20)
    square = distance_model("l2sq", 5)
    square.sketch.copy_(dp_kde.class_sums(square, x, y, 2))
    exact = exact_distance_sums(x, y, queries, 2.0, square=True)
    assert torch.allclose(square.similarity_sums(queries).double(), exact, rtol=1e-4)
    euclid = distance_model("l2", 5, projections=2000, levels=8)
    euclid.sketch.copy_(dp_kde.class_sums(euclid, x, y, 2))
    exact = exact_distance_sums(x, y, queries, 2.0)
    relative = (euclid.similarity_sums(queries).double() - exact).abs() / exact
    assert float(relative.max()) < 0.1  # p-stable embedding, k = 2000: error ~ 1/sqrt(k) per pair
    # nearest class mean by either metric: class 1 sits around 0.9, class 0 around 0.1
    near = torch.cat([torch.full((20, 5), 0.1), torch.full((20, 5), 0.9)]) + torch.rand(40, 5) * 0.05
    labels = torch.tensor([0] * 20 + [1] * 20)
    for model in (square, euclid):
        model.sketch.copy_(dp_kde.class_sums(model, near, labels, 2))
        assert torch.equal(model(near).argmax(1), labels)


@pytest.mark.parametrize("metric", ["l1", "l2", "l2sq"])
def test_distance_rows_stay_within_their_sensitivity_whatever_the_input(metric: str) -> None:
    model = distance_model(metric, 6, levels=4, projections=16)
    wild = torch.cat([torch.randn(200, 6) * 100, torch.rand(200, 6), torch.ones(1, 6), torch.zeros(1, 6)])
    rows = model.rows(wild).double()
    l2, l1 = model.sensitivity()
    assert float(rows.norm(dim=1).max()) <= l2 * (1 + 1e-6)
    assert float(rows.abs().sum(1).max()) <= l1 * (1 + 1e-6)
    assert torch.equal(rows[:, -1], torch.ones(len(wild), dtype=rows.dtype))  # the count entry
    params = dp_kde.DpKdeParams(epsilon=1.0, delta=1e-5)
    assert dp_kde.noise_scale(params, model.sensitivity()) == pytest.approx(ldp.analytic_gaussian_sigma(l2, 1.0, 1e-5))


def test_a_server_sent_sensitivity_does_not_lower_the_clients_noise() -> None:
    scenario = {**KDE_SCENARIO, "model": {"name": "distance", "metric": "l2sq"}}
    setup = call_for(scenario, RecordDict()).setup
    sent = setup.new_model().state_dict()
    sent[dp_kde.SENSITIVITY] = torch.tensor([1e-9, 1e-9], dtype=torch.float64)  # a lying server
    content = RecordDict({"arrays": ArrayRecord(sent), "config": ConfigRecord({"release-cohort": 4})})
    reply = dp_kde.release(content, call_for(scenario, RecordDict()))
    released = reply["arrays"].to_torch_state_dict()[dp_kde.SKETCH]
    data = call_for(scenario, RecordDict()).train_data()
    exact = dp_kde.class_sums(setup.new_model(), data.x, data.y, 10)
    sigma = dp_kde.noise_scale(dp_kde.DpKdeParams(epsilon=2.0), dp_kde.Sensitivity(math.sqrt(3), 0.0))
    assert float((released - exact).std()) == pytest.approx(sigma, rel=0.25)


@pytest.mark.parametrize(("metric", "epsilon", "least"), [("l2sq", 8.0, 0.7), ("l1", 8.0, 0.3), ("l1", 1e3, 0.85), ("l2", 1e3, 0.75)])
def test_dp_distance_federation_reports_accuracy_and_its_epsilon(tmp_path, metric: str, epsilon: float, least: float) -> None:
    from fedsim.core.results import RunDirectory
    from fedsim.federation.simulation import run_federation

    spec = {
        **KDE_SCENARIO,
        "model": {"name": "distance", "metric": metric, "levels": 4, "projections": 32},
        "federation": {"strategy": {"name": "dp_kde", "epsilon": epsilon}, "rounds": 1},
    }
    run = RunDirectory(tmp_path)
    run_federation(build_scenario(spec), run)
    (record,) = list(run.metrics())[-1:]
    assert record["test_accuracy"] > least  # 10 classes: chance is 0.1; noiseless: l1 0.90, l2 0.83
    (entry,) = record["privacy"]
    assert (entry["key"], entry["epsilon"], entry["kind"]) == ("max_client_kde_epsilon", epsilon, "example")


def test_tree_count_query_counts_every_example_with_less_noise() -> None:
    model = distance_model("l1", 4, levels=3)
    x, y = torch.rand(37, 4), torch.zeros(37, dtype=torch.long)
    model.sketch.copy_(dp_kde.class_sums(model, x, y, 2))
    assert float(model.sketch[0] @ model.count_query) == pytest.approx(37.0, rel=1e-5)
    assert float(model.count_query.norm()) == pytest.approx((1 + 4 * (1 - 2**-3)) ** -0.5, rel=1e-5)


@pytest.mark.parametrize(("change", "named"), [
    ({"model": {"name": "distance"}, "federation": {"strategy": "fedavg"}}, "set federation.strategy: dp_kde"),
    ({"model": {"name": "mlp"}}, "set model: kde or model: distance"),
    ({"model": {"name": "distance", "low": 1.0, "high": 0.5}}, "'high'"),
])
def test_sketch_models_and_the_dp_kde_strategy_are_refused_apart(tmp_path, change: dict, named: str) -> None:
    from cli_helpers import run_cli

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**KDE_SCENARIO, **change}))
    code, _, err = run_cli("validate", path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and named in err
