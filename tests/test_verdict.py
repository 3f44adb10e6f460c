"""pipeline.verdict: the paper's claims per table, judged paired by seed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.verdict import (FLAT_BAND, Claim, Flat, Ordering, Verdict, judge, paper_claim)


@dataclass(frozen=True)
class Row:
    label: str
    paper: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    value: Any = None


# The paper's numbers (ATSS.md section 6.3)
T3 = [Row("RetinaNet (#A=1)", {"AP": 37.0}), Row("RetinaNet (#A=1) + ATSS", {"AP": 39.3}, {"assigner": "atss"}),
      Row("FCOS", {"AP": 37.8}), Row("FCOS + Center sampling", {"AP": 38.6}), Row("FCOS + ATSS", {"AP": 39.2})]
T4 = [Row(f"k={k}", {"AP": ap}, {"topk": k}, k)
      for k, ap in zip(range(3, 20, 2), (38.0, 38.8, 39.1, 39.3, 39.1, 39.0, 39.1, 39.2, 38.9))]
T7 = [Row("RetinaNet (#A=9) #sc=3 #ar=3", {"AP": 36.3}), Row("+Imprs. #sc=3 #ar=3", {"AP": 38.4}),
      Row("+Imprs.+ATSS #sc=3 #ar=3", {"AP": 39.2}, {"assigner": "atss"}),
      Row("+Imprs.+ATSS #sc=3 #ar=1", {"AP": 39.3}, {"assigner": "atss"}),
      Row("+Imprs.+ATSS #sc=1 #ar=3", {"AP": 39.2}, {"assigner": "atss"}),
      Row("+Imprs.+ATSS #sc=1 #ar=1", {"AP": 39.3}, {"assigner": "atss"})]


def paper_ap(rows, seed_offsets=(0.0,)):
    """The paper's AP as if it were our result in each seed, every row shifted by the seed's offset."""
    return {s: {r.label: r.paper["AP"] + off for r in rows} for s, off in enumerate(seed_offsets)}


def test_the_papers_own_numbers_satisfy_its_claims():
    for table, rows in (("atss_vs_baselines", T3), ("k", T4), ("anchors_per_location", T7)):
        claim = paper_claim(table, rows)
        # a whole-table shift per seed (a hard seed) changes nothing paired by seed
        assert judge(claim, paper_ap(rows, (0.0, -3.0, 1.5))).verdict is Verdict.EVERY_SEED, table


def test_t3_ties_in_the_paper_are_not_an_ordering():
    pairs = paper_claim("atss_vs_baselines", T3).test.pairs
    assert ("RetinaNet (#A=1) + ATSS", "FCOS + ATSS") not in pairs and ("FCOS + ATSS", "RetinaNet (#A=1) + ATSS") not in pairs
    assert ("FCOS + ATSS", "FCOS + Center sampling") in pairs  # 0.6 AP apart
    assert ("FCOS", "RetinaNet (#A=1)") in pairs and len(pairs) == 9


def test_t4_leaves_out_k_below_5_as_the_paper_does():
    claim = paper_claim("k", T4)
    assert "k=3" not in claim.test.rows and len(claim.test.rows) == 8
    # with k=3 the paper's own table is not flat: k=3 is 0.94 below the mean
    assert not Flat(tuple(r.label for r in T4)).check({r.label: r.paper["AP"] for r in T4}).holds
    assert claim.test.band == FLAT_BAND == 0.5


def test_t7_compares_only_the_atss_rows():
    assert paper_claim("anchors_per_location", T7).test.rows == tuple(r.label for r in T7[2:])
    assert paper_claim("anchors_per_location", T7[:3]) is None  # one ATSS row: nothing to compare


def test_no_claim_for_other_tables_or_too_few_rows():
    assert paper_claim("backbone", T4) is None
    assert paper_claim("k", T4[:2]) is None  # only k=3, 5: one row at k >= 5


ORDER = Claim("3", "A > B", Ordering((("A", "B"),)))


def test_one_seed_cannot_tell_but_says_what_it_saw():
    j = judge(ORDER, {0: {"A": 30.0, "B": 28.0}})
    assert j.verdict is Verdict.CANNOT_TELL
    assert j.text() == "A > B: cannot tell with one seed (in seed 0 it holds: A > B: +2.0 AP)"
    j = judge(ORDER, {7: {"A": 27.0, "B": 28.0}})
    assert j.verdict is Verdict.CANNOT_TELL and "in seed 7 it does not: reversed: A > B: -1.0 AP" in j.text()


def test_paired_by_seed():
    # seed 1 is hard for both; A wins both seeds although B's best beats A's worst
    j = judge(ORDER, {0: {"A": 30.0, "B": 28.0}, 1: {"A": 10.0, "B": 5.0}})
    assert j.verdict is Verdict.EVERY_SEED and "in 2/2 seeds" in j.text()
    j = judge(ORDER, {0: {"A": 30.0, "B": 28.0}, 1: {"A": 4.0, "B": 5.0}})
    assert j.verdict is Verdict.MEAN_ONLY and "in 1/2 seeds" in j.text() and "seed 1: no" in j.text()
    j = judge(ORDER, {0: {"A": 30.0, "B": 28.0}, 1: {"A": 2.0, "B": 5.0}})
    assert j.verdict is Verdict.DOES_NOT_HOLD and j.on_mean.detail == "reversed: A > B: -0.5 AP"


def test_flat_is_within_the_band_of_the_mean():
    claim = Claim("4", "flat", Flat(("k=5", "k=9", "k=13")))
    flat = {0: {"k=5": 30.0, "k=9": 30.4, "k=13": 29.7}, 1: {"k=5": 25.0, "k=9": 25.3, "k=13": 25.2}}
    assert judge(claim, flat).verdict is Verdict.EVERY_SEED
    # the one-seed demo numbers 29.6 / 29.2 / 29.2: flat in that seed, but one seed cannot tell
    j = judge(claim, {0: {"k=5": 29.6, "k=9": 29.2, "k=13": 29.2}})
    assert j.verdict is Verdict.CANNOT_TELL and j.per_seed[0].holds
    # docs/ablation.md's 26.2 / 27.6 / 29.7: 3.5 AP apart, not flat
    assert not Flat(("a", "b", "c")).check({"a": 26.2, "b": 27.6, "c": 29.7}).holds
    steep = {0: {"k=5": 30.0, "k=9": 31.0, "k=13": 32.0}, 1: {"k=5": 25.0, "k=9": 25.1, "k=13": 25.2}}
    j = judge(claim, steep)  # means 27.5 / 28.05 / 28.6: k=5 0.55 below their mean
    assert j.verdict is Verdict.DOES_NOT_HOLD
    mixed = {0: {"k=5": 30.0, "k=9": 31.0, "k=13": 30.0}, 1: {"k=5": 25.0, "k=9": 24.6, "k=13": 25.2}}
    assert judge(claim, mixed).verdict is Verdict.MEAN_ONLY


def test_only_seeds_with_every_row_are_paired():
    j = judge(ORDER, {0: {"A": 30.0, "B": 28.0}, 1: {"A": 10.0}, 2: {"A": 9.0, "B": 5.0}})
    assert j.seeds == (0, 2) and j.verdict is Verdict.EVERY_SEED
    j = judge(ORDER, {0: {"A": 30.0}, 1: {"A": 10.0}})
    assert j.verdict is Verdict.CANNOT_TELL and "rows missing in every seed: B" in j.text()
