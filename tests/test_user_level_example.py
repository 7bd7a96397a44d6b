"""examples/user_level_lm.py end to end at a tiny scale (--quick: scikit-learn's files as authors):
the user-level run trains (the private model moves), spends exactly the target user-level epsilon,
and every private batch is made of whole authors, at most max_rows_per_user rows each."""
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import user_level_lm as example  # noqa: E402

import fxclip.user_sampling as user_sampling  # noqa: E402


def test_authors_are_the_defining_files():
    pairs = example.docstrings_by_author(["sklearn.linear_model"])
    authors = {a for a, _ in pairs}
    assert len(authors) > 3 and all(a.startswith("sklearn.linear_model.") for a in authors)
    assert len({t for _, t in pairs}) == len(pairs)
    train, test = example.split_authors(pairs, seed=0)
    assert not ({a for a, _ in train} & {a for a, _ in test}) and test


def test_example_runs_at_user_level(monkeypatch, capsys):
    batches = []
    draw = user_sampling.UserPoissonBatchSampler._rows

    def recording(self, users):
        rows = draw(self, users)
        batches.append((self.users, users, rows, self.max_rows_per_user))
        return rows

    monkeypatch.setattr(user_sampling.UserPoissonBatchSampler, "_rows", recording)
    example.main(["--quick", "--epsilon", "6"])
    out = capsys.readouterr().out
    assert re.search(r"user-level epsilon 6\.00 at delta 1e-05", out), out
    public = float(re.search(r"public model: ([\d.]+) bits", out).group(1))
    private = float(re.search(r"private fine-tuning .*: ([\d.]+) bits per byte", out).group(1))
    assert 0 < private < 9 and private != public  # trained, finite
    assert len(batches) >= 2
    for users, chosen, rows, cap in batches:
        per_user = np.bincount(users.user_of_row[rows], minlength=users.num_users)
        assert (per_user[chosen] == np.minimum(users.counts[chosen], cap)).all()
        assert per_user.sum() == len(rows)
