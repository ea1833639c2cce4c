"""The blocked summary (fxprune.blocked): share of prunable channels blocked, causes grouped by op,
the warning that names the first op to teach, and where it shows (explain, size report/table)."""
import warnings

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.blocked import blocked_summary
from fxprune.errors import BlockedWarning
from fxprune.report import size_report, size_table


@torch.fx.wrap
def mystery_mix(x):
    """An op fxprune has no rule for (wrapped: one call_function node)."""
    return x.flip(1)


@torch.fx.wrap
def other_mix(x):
    return x.roll(1, 1)


class Leaf(nn.Module):
    """A leaf module without a rule."""

    def forward(self, x):
        return x.flip(1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return mystery_mix(self.conv(x))


class Net(nn.Module):
    """stem 16 (free), blocks.0/1 16 each (mystery_mix), mid ``leaf_c`` (Leaf), tail 4
    (other_mix), head 2 (a model output)."""

    def __init__(self, leaf_c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.mid, self.leaf = nn.Conv2d(16, leaf_c, 1), Leaf()
        self.tail, self.head = nn.Conv2d(leaf_c, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.leaf(self.mid(self.blocks(torch.relu(self.stem(x)))))
        return self.head(other_mix(self.tail(y)))


X = (torch.randn(1, 3, 4, 4),)


def _plan(model=None, **policy):
    return fxprune.plan(model or Net(), fxprune.Policy(**policy), X, leaf_modules=(Leaf,))


def test_share_excludes_channels_kept_for_outputs_and_counts_every_pinned_channel():
    s = blocked_summary(_plan())
    assert (s.channels, s.blocked) == (16 + 16 + 16 + 8 + 4, 16 + 16 + 8 + 4)
    assert s.share == pytest.approx(44 / 60)
    assert s.output_groups == 1 and s.outputs == ["#0"]
    assert not s.nothing_to_prune


def test_causes_are_grouped_by_op_not_by_node():
    s = blocked_summary(_plan())
    assert [(c.op, c.kind, c.channels) for c in s.causes] == [
        ("mystery_mix", "function", 32), ("Leaf", "module", 8), ("other_mix", "function", 4)]
    first = s.causes[0]
    assert first.sites == {"blocks.0": 16, "blocks.1": 16}
    assert s.causes[1].module_type is Leaf and s.causes[1].where == "leaf"
    assert s.line() == ("Blocked: 73% of 60 prunable channels; top reasons: `mystery_mix` at blocks.0 +1 more "
                        "(32 ch), `Leaf` at leaf (8 ch), `other_mix` at other_mix (4 ch)")


def test_the_site_of_a_function_is_the_module_it_is_called_in_else_its_node():
    s = blocked_summary(_plan())
    where = {c.op: c.where for c in s.causes}
    assert where["mystery_mix"] == "blocks.0"     # inside Block: the module path
    assert where["other_mix"] == "other_mix"      # in the model's own forward: the node


def test_explain_starts_with_the_line_and_warns_when_more_than_half_is_blocked():
    plan = _plan()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = fxprune.explain(plan)
    lines = text.splitlines()
    assert lines[0].startswith("Blocked: 73% of 60 prunable channels; top reasons: `mystery_mix`")
    assert lines[1].startswith("Warning: more than half of the prunable channels are blocked (73%)")
    assert "`mystery_mix`" in lines[1] and 'capture="export"' in lines[1] and "leaf_modules=" in lines[1]
    blocked = [w for w in caught if issubclass(w.category, BlockedWarning)]
    assert len(blocked) == 1 and str(blocked[0].message) == lines[1][len("Warning: "):]
    assert fxprune.BlockedWarning is BlockedWarning


def test_a_leaf_module_as_first_cause_is_taught_with_register_module_rule():
    s = blocked_summary(_plan(Net(leaf_c=64)))
    assert s.causes[0].op == "Leaf" and s.causes[0].channels == 64
    advice = s.advice()
    assert "fxprune.register_module_rule(Leaf, rule)" in advice
    assert callable(fxprune.register_module_rule)


def test_no_warning_when_at_most_half_is_blocked():
    class Free(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 32, 1), nn.Conv2d(32, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(mystery_mix(self.b(torch.relu(self.a(x)))))
    plan = fxprune.plan(Free(), fxprune.Policy(), X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BlockedWarning)
        text = fxprune.explain(plan)
    assert text.splitlines()[0] == "Blocked: 20% of 40 prunable channels; top reasons: `mystery_mix` at mystery_mix (8 ch)"
    assert "Warning:" not in text


def test_policy_ignore_is_its_own_cause_and_not_an_op_to_teach():
    s = blocked_summary(_plan(ignore=("stem",)))
    ignore = next(c for c in s.causes if c.kind == "policy")
    assert (ignore.op, ignore.where, ignore.channels) == ("policy.ignore", "stem", 16)
    assert "`mystery_mix`" in s.advice()


def test_size_report_and_table_carry_the_summary():
    pruned = fxprune.apply(_plan())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = size_report(pruned)
    assert any(issubclass(w.category, BlockedWarning) for w in caught)
    assert report["blocked"]["channels"] == 60 and report["blocked"]["blocked"] == 44
    assert [n for _, n in report["blocked"]["top"]] == [32, 8, 4]
    table = size_table(report)
    assert table.splitlines()[0] == report["blocked"]["line"]
    assert table.splitlines()[1].startswith("Warning: more than half")


def test_an_unblocked_plan_reports_zero():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    s = blocked_summary(fxprune.plan(m, fxprune.Policy(), (torch.randn(1, 3, 8, 8),)))
    assert (s.channels, s.blocked, s.causes, s.line()) == (8, 0, [], "Blocked: 0% of 8 prunable channels")
    assert s.advice() is None


def test_cli_prune_prints_the_line_after_the_capture_line(capsys):
    from fxprune.cli import main
    assert main(["prune", "squeezenet1_1", "--input-size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("captured with torch.fx")
    assert lines[1] == "Blocked: 0% of 2,944 prunable channels"
