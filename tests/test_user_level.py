"""User-level DP (docs/privacy-units.md): the user-level Poisson loader, and make_private(...,
privacy_unit="user") runs as a training loop makes them: Poisson batches of users whose sizes
change every step, keyword tensors with padding masks, padded batches, eager and compiled,
checked at every step against per_unit_reference (float64, torch.func per-row gradients summed
by user and clipped)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import D, MaskedBag, per_row_loss, sq_loss
from reference import per_unit_reference
from torch.utils.data import DataLoader, TensorDataset

import fxclip
from fxclip.accounting import Accountant
from fxclip.user_sampling import UserIndex, UserPoissonBatchSampler

C = 0.3


def test_users_are_sampled_with_rate_q_and_all_their_rows():
    """Every batch is a union of whole users; each user is in a batch with probability q, all
    users independently (the joint inclusion of two users is q^2)."""
    counts = [1, 4, 2, 7, 1, 3] * 5
    ids = np.repeat(np.arange(len(counts)) * 7 - 20, counts)  # any ints, rows grouped or not
    ids = ids[np.random.default_rng(0).permutation(len(ids))]
    users = UserIndex(ids)
    q, n = 0.2, 4000
    sampler = UserPoissonBatchSampler(users, q, n, torch.Generator().manual_seed(0))
    inclusion = np.zeros((n, users.num_users), bool)
    for b, rows in enumerate(sampler):
        assert len(set(rows)) == len(rows)
        present = np.unique(users.user_of_row[rows])
        assert len(rows) == users.counts[present].sum()  # whole users only
        inclusion[b, present] = True
    assert len(list(sampler)) == n
    sd = (q * (1 - q) / n) ** 0.5
    assert np.abs(inclusion.mean(0) - q).max() < 5 * sd
    joint = (inclusion[:, 0] & inclusion[:, 1]).mean()
    assert abs(joint - q * q) < 5 * (q * q / n) ** 0.5
    assert (inclusion.sum(1) == 0).any()  # empty batches happen and are yielded


def test_a_cap_takes_a_uniform_subset_of_each_users_rows():
    counts = np.array([1, 2, 5, 9])
    users = UserIndex(np.repeat(np.arange(4), counts))
    sampler = UserPoissonBatchSampler(users, 0.5, 3000, torch.Generator().manual_seed(1), max_rows_per_user=2)
    seen = np.zeros(counts.sum())
    subsets = set()
    included = np.zeros(4)
    for rows in sampler:
        per_user = np.bincount(users.user_of_row[rows], minlength=4)
        present = per_user > 0
        assert (per_user[present] == np.minimum(counts, 2)[present]).all()
        included += present
        seen[rows] += 1
        subsets.add(tuple(sorted(r for r in rows if users.user_of_row[r] == 3)))
    assert len(subsets) > 20  # a new subset at each inclusion
    rate = seen / np.repeat(included, counts)  # each row of a capped user: cap / its rows
    expected = np.repeat(np.minimum(1.0, 2 / counts), counts)
    assert np.abs(rate - expected).max() < 0.06


def test_ranks_share_out_the_users():
    """Rank r draws only users u % W == r: a user never spans processes, the shares cover all."""
    users = UserIndex(np.repeat(np.arange(10), 3))
    seen = []
    for rank in range(3):
        sampler = UserPoissonBatchSampler(users, 0.5, 200, torch.Generator().manual_seed(0), rank=rank, world_size=3)
        mine = {int(u) for rows in sampler for u in users.user_of_row[rows]}
        assert mine == set(range(rank, 10, 3))
        seen.append(mine)
    assert set().union(*seen) == set(range(10))


# --- make_private(..., privacy_unit="user"): training runs ---

def user_dataset(n_users=12, seed=0):
    """Rows of users with 1 to 6 rows each (string ids), token ids right-padded with a mask, and
    each row's index + 1 (so the test finds a batch's rows; 0 marks a padding row)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 7, (n_users,), generator=g).tolist()
    users = [f"author-{u}" for u, k in enumerate(counts) for _ in range(k)]
    n = len(users)
    lengths = torch.randint(1, 7, (n,), generator=g)
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    tokens = torch.randint(1, 30, (n, 6), generator=g) * mask
    y = torch.randn(n, 3, dtype=D, generator=g) * 3
    return TensorDataset(tokens, mask, y, torch.arange(1, n + 1)), users


@pytest.mark.parametrize("compiled, pad", [(False, None), (True, 8)])
def test_user_level_run_is_exact_at_every_step(compiled, pad):
    """SGD at lr 1 without noise: each step moves the parameters by minus the sum over the
    batch's users of their clipped summed gradients, divided by the expected users per batch."""
    dataset, users = user_dataset()
    torch.manual_seed(0)
    model = MaskedBag().to(D)
    oracle = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pm, dp_opt, loader = fxclip.make_private(
        model, opt, DataLoader(dataset, batch_size=4), noise_multiplier=0.0, max_grad_norm=C,
        loss_fn=per_row_loss, privacy_unit="user", user_ids=users, pad_to_multiple=pad,
        generator=torch.Generator().manual_seed(3))
    run = torch.compile(pm) if compiled else pm
    user_of = UserIndex(users).user_of_row
    sizes, clipped = set(), 0
    for _ in range(2):  # epochs
        for tokens, mask, y, row in loader:
            real = row > 0
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            oracle.load_state_dict(model.state_dict())
            run(tokens, attention_mask=mask, target=y).mean().backward()
            dp_opt.step()
            dp_opt.zero_grad()
            ids = torch.as_tensor(user_of[(row[real] - 1).numpy()])
            sizes.add(int(real.sum()))
            assert dp_opt.last_units == len(ids.unique()) and dp_opt.last_batch_size == int(real.sum())
            if not real.any():
                assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
                continue
            expected, norms = per_unit_reference(oracle, (tokens[real], mask[real]), y[real], sq_loss, C, ids,
                                                 "sum")
            clipped += int((norms > C).sum())
            for n, p in model.named_parameters():
                torch.testing.assert_close(before[n] - p.detach(), expected[n] / 4, rtol=1e-9, atol=1e-12, msg=n)
    assert len(sizes) > 3 and clipped > 0
    assert dp_opt.expected_batch_size == 4 and dp_opt.sample_rate == 4 / 12


def test_user_level_noise_and_epsilon_are_per_user():
    """sigma C / (expected users) per coordinate; epsilon is the accountant's on the user rate."""
    dataset, users = user_dataset(n_users=20)
    model = MaskedBag().to(D)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pm, dp_opt, loader = fxclip.make_private(
        model, opt, DataLoader(dataset, batch_size=5), noise_multiplier=1.3, max_grad_norm=C,
        loss_fn=per_row_loss, privacy_unit="user", user_ids=users, max_rows_per_user=2,
        generator=torch.Generator().manual_seed(0))
    moves = []
    for tokens, mask, y, _ in loader:
        before = model.emb.weight.detach().clone()
        pm(tokens, attention_mask=mask, target=y).mean().backward()
        dp_opt.step()
        dp_opt.zero_grad()
        moves.append((before - model.emb.weight.detach()).flatten())
    accountant = Accountant("rdp")
    for _ in range(len(loader)):
        accountant.step(1.3, 5 / 20)
    assert dp_opt.epsilon(1e-5) == pytest.approx(accountant.epsilon(1e-5), rel=1e-12)
    # the clipped sum moves the used rows; every row's coordinate carries the noise
    std = torch.cat(moves).std().item()
    assert std == pytest.approx(1.3 * C / 5, rel=0.1)


def test_training_outside_the_loaders_batches_is_refused():
    dataset, users = user_dataset()
    model = MaskedBag().to(D)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pm, dp_opt, loader = fxclip.make_private(
        model, opt, DataLoader(dataset, batch_size=4), noise_multiplier=1.0, max_grad_norm=C,
        loss_fn=per_row_loss, privacy_unit="user", user_ids=users, generator=torch.Generator().manual_seed(0))
    tokens, mask, y, _ = dataset[:5]
    with pytest.raises(fxclip.PrivacyError) as info:  # no loader batch: rows would be clipped alone
        pm(tokens, attention_mask=mask, target=y)
    assert info.value.id == "units-missing"
    batches = iter(loader)  # held: a loader left by `break` is closed and forgets its ids
    tokens, mask, y, _ = next(batches)
    while tokens.shape[0] < 2:
        tokens, mask, y, _ = next(batches)
    with pytest.raises(fxclip.PrivacyError) as info:  # part of the batch
        pm(tokens[:1], attention_mask=mask[:1], target=y[:1])
    assert info.value.id == "units-rows-mismatch"
    with pytest.raises(fxclip.PrivacyError) as info:  # other ids than the sampled users'
        pm(tokens, attention_mask=mask, target=y, privacy_unit=torch.arange(tokens.shape[0]))
    assert info.value.id == "units-two-sources"
    batches.close()  # the loader's ids are gone
    half = tokens.shape[0] // 2  # gradient accumulation over parts, with ids passed explicitly
    ids = torch.arange(tokens.shape[0])
    for part in (slice(0, half), slice(half, None)):
        pm(tokens[part], attention_mask=mask[part], target=y[part], privacy_unit=ids[part]).mean().backward()
    with pytest.raises(fxclip.PrivacyError) as info:
        dp_opt.step()
    assert info.value.id == "units-several-backwards"
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():  # evaluation needs no ids
        assert pm(tokens, attention_mask=mask).shape == (tokens.shape[0], 3)


def test_user_level_options_are_checked():
    dataset, users = user_dataset()
    opt = torch.optim.SGD(MaskedBag().parameters(), lr=1.0)
    loader = DataLoader(dataset, batch_size=4)
    common = dict(noise_multiplier=1.0, max_grad_norm=C, loss_fn=per_row_loss)
    with pytest.raises(ValueError, match="user_ids"):
        fxclip.make_private(MaskedBag(), opt, loader, privacy_unit="user", **common)
    with pytest.raises(ValueError, match="privacy_unit"):
        fxclip.make_private(MaskedBag(), opt, loader, user_ids=users, **common)
    with pytest.raises(ValueError, match="exceeds the 12 users"):
        fxclip.make_private(MaskedBag(), opt, DataLoader(dataset, batch_size=13), privacy_unit="user",
                            user_ids=users, **common)
    with pytest.raises(ValueError, match="one per row"):
        fxclip.make_private(MaskedBag(), opt, loader, privacy_unit="user", user_ids=users[:-1], **common)


def test_worker_processes_give_the_same_batches_and_ids():
    """With num_workers the loader still knows each batch's users (the rows' indices travel with
    the collated batch): the same batches and unit ids as in the main process."""
    dataset, users = user_dataset()
    seen = []
    for workers in (0, 2):
        model = MaskedBag().to(D)
        pm, _, loader = fxclip.make_private(
            model, torch.optim.SGD(model.parameters(), lr=1.0),
            DataLoader(dataset, batch_size=4, num_workers=workers), noise_multiplier=1.0, max_grad_norm=C,
            loss_fn=per_row_loss, privacy_unit="user", user_ids=users, generator=torch.Generator().manual_seed(4))
        seen.append([(row.tolist(), pm._loader_units.tolist()) for _, _, _, row in loader])
    assert seen[0] == seen[1] and any(rows for rows, _ in seen[0])
    user_of = UserIndex(users).user_of_row
    for rows, ids in seen[0]:
        assert ids == [int(user_of[r - 1]) for r in rows]
