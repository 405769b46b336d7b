"""The IPO paper's illustrative bandit (Azar et al. 2023, Sec. 5) through the service's trainer and loss."""

from __future__ import annotations

import json

import pytest

from worker.training import paper

PREFS = "y1>y2,y2>y3,y1>y3"
REFERENCE = {
    0.1: (0.964370, 0.034403, 0.001227),
    0.5: (0.562742, 0.288921, 0.148337),
    1.0: (0.448441, 0.321322, 0.230237),
}


@pytest.mark.parametrize("tau", sorted(REFERENCE))
def test_closed_form_matches_reference_values(tau: float) -> None:
    actions, pairs = paper.parse_prefs(PREFS)
    assert actions == ["y1", "y2", "y3"]
    got = paper.ipo_optimum(len(actions), pairs, tau)
    assert got == pytest.approx(REFERENCE[tau], abs=1e-5)


def test_closed_form_handles_repeats_contradictions_and_components() -> None:
    actions, pairs = paper.parse_prefs("a>b,b>a,a>b,c>d")
    pi = paper.ipo_optimum(len(actions), pairs, 1.0)
    assert sum(pi) == pytest.approx(1.0)
    assert pi[0] > pi[1] and pi[2] > pi[3]
    # a>b twice, b>a once: minimise 2(d - c)^2 + (-d - c)^2 -> d = c/3, with c = 1/(2 tau) = 0.5
    u = paper.ipo_log_ratios(len(actions), pairs, 1.0)
    assert u[0] - u[1] == pytest.approx(0.5 / 3)
    assert u[2] - u[3] == pytest.approx(0.5)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_trained_ipo_policy_matches_closed_form(tau: float) -> None:
    result = paper.train_bandit(PREFS, tau, loss="ipo", steps=40)
    assert result.max_abs_diff < 0.005, paper.format_table(result)
    assert result.learned == pytest.approx(REFERENCE[tau], abs=0.005)


def test_dpo_collapses_to_the_top_action() -> None:
    result = paper.train_bandit(PREFS, 0.5, loss="dpo", steps=60)
    assert result.learned[0] > 0.99, paper.format_table(result)
    assert result.max_abs_diff > 0.3  # far from IPO's regularised optimum


def test_non_uniform_reference() -> None:
    result = paper.train_bandit(PREFS, 0.5, ref="0.5,0.3,0.2", steps=40)
    assert result.ref == pytest.approx([0.5, 0.3, 0.2])
    assert result.optimum == pytest.approx(paper.ipo_optimum(3, [(0, 1), (1, 2), (0, 2)], 0.5, [0.5, 0.3, 0.2]))
    assert result.optimum[0] > REFERENCE[0.5][0]  # the reference's tilt survives
    assert result.max_abs_diff < 0.005, paper.format_table(result)


def test_ipo_loss_of_one_pair_through_the_trainer() -> None:
    """Policy log-probs (-1, -3), reference (-2, -2), beta 0.5: h = 2, (2 - 1/(2*0.5))^2 = 1. Computed by
    ``IpoDPOTrainer.compute_loss`` (TRL ``DPOTrainer._compute_loss``, loss_type "ipo") on a collated batch."""
    assert paper.ipo_pair_loss((-1.0, -3.0), (-2.0, -2.0), 0.5) == pytest.approx(1.0)
    assert paper.trl_pair_loss((-1.0, -3.0), (-2.0, -2.0), 0.5) == pytest.approx(1.0, abs=1e-5)


def test_parse_errors() -> None:
    with pytest.raises(ValueError):
        paper.parse_prefs("y1>y1")
    with pytest.raises(ValueError):
        paper.parse_prefs("y1")
    with pytest.raises(ValueError):
        paper.parse_ref("0.5,0.5", 3)


def test_cli_paper_check_json() -> None:
    from typer.testing import CliRunner

    from ipo_cli.main import app

    result = CliRunner().invoke(app, ["paper-check", "--prefs", PREFS, "--tau", "0.5", "--steps", "40", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["ok"] is True and data["loss"] == "ipo"
    assert data["learned"] == pytest.approx(list(REFERENCE[0.5]), abs=0.005)
    assert data["ipo_optimum"] == pytest.approx(list(REFERENCE[0.5]), abs=1e-5)


def test_cli_paper_check_fails_when_not_converged() -> None:
    from typer.testing import CliRunner

    from ipo_cli.main import app

    result = CliRunner().invoke(app, ["paper-check", "--tau", "0.1", "--steps", "1", "--json"])
    assert result.exit_code == 1, result.output
