"""ReMax vs a PPO-style baseline with a value model, on WordNet-LM + LoRA learning to write glosses, in one run.

    flock /work/wt/heavy.lock python benchmarks/remax.py [--out benchmarks/results/remax] --threads 1

Task: the held-out WordNet synsets of `gloss-generation` (WordNet-LM never saw them): prompt `<lemma> (<pos>):`,
response = a definition (at most 24 new tokens). Reward (`deltatune.data.gloss_generation.gloss_rewards`): MiniLM
cosine similarity of the generated definition to the true one, with echoes of the lemma removed and repetition
discounted (empty output scores 0). Policy: WordNet-LM with a LoRA (rank 8, Wq Wv); reference: the same model
with the adapter disabled (both methods). Budget: the same prompt batches (`--batch` prompts × `--steps` steps,
drawn from the train split in a seeded order), one sampled response per prompt for each method; ReMax also
greedy-decodes each prompt (its baseline), PPO instead runs a critic.

Contenders (same sampler: temperature 1, top-p 0.9; same β = 0.05 per-token KL; reward clip 5):
- `remax`: `deltatune.train.ReMax` (γ = 0.99, one gradient step per rollout batch).
- `ppo`: a minimal PPO as in DeepSpeed-Chat's step 3 (the baseline of the ReMax paper): a separate critic = a
  second WordNet-LM copy with its own LoRA and a linear value head (zero init) on the last hidden state; per-token
  rewards −β(log π_old − log π_ref) plus the clipped reward on the last token; GAE (γ = 1, λ = 0.95, no advantage
  whitening, as DeepSpeed-Chat); one pass over the rollout in 2 minibatches (so the clipped ratio, ε = 0.2, acts on
  the second); clipped value loss (0.2), critic trained with AdamW at the actor's rate.

Learning rate: every seed runs at the first rate of `--lrs`, then the other rates run on the first seed, and a
rate that beats the first there gets the other seeds too (a grid on one seed, not on all: the 25-minute budget;
the order puts the comparison itself first in case `--stop-by` cuts the run short). Measured per run, each
run in a fresh process under /usr/bin/time -v: held-out reward (greedy decode of `--eval-prompts` validation
prompts) and the raw task metric (MiniLM similarity, no anti-gaming) every `--eval-every` steps; KL(π_θ ‖ π_ref)
per token, exact over the vocabulary, along sampled responses to the same prompts (fixed sampler seed); the test
reward at the end (`--test-prompts` test prompts); peak RSS (/usr/bin/time's "Maximum resident set size", whole
process: Python, torch, MiniLM, models); the model state each method holds (tensor sizes: weights of a second
model, trainable parameters, gradients, AdamW moments); the median training step time (generation + update).
Runs alternate remax / ppo; results are logged in <out>.jsonl (resumable), <out>.md and <out>.png from it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.bench import harness  # noqa: E402
from deltatune.data.gloss_generation import gloss_rewards, gloss_similarity, prompt_ids_of_rows  # noqa: E402
from deltatune.data.wordnet_lm import load_wordnet_lm, load_wordnet_lm_model, read_heldout_rows  # noqa: E402
from deltatune.train.remax import ReMax, ReMaxConfig, Rollout  # noqa: E402

METHODS = ("remax", "ppo")
LORA = {"rank": 8, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}
EVAL_SEED = 10_000


def gloss_reward(texts: list[str], rows) -> torch.Tensor:
    return gloss_rewards(texts, [row["gloss"] for row in rows], [row["lemma"] for row in rows])


# --- the PPO-style baseline -----------------------------------------------------------------------------------
def rows_of(rollout: Rollout, index: torch.Tensor) -> Rollout:
    return Rollout(rollout.sequences[index], rollout.attention_mask[index], rollout.response_mask[index],
                   rollout.prompt_width, [rollout.texts[i] for i in index.tolist()])


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over the response tokens (values and rewards are 0 after the end)."""
    values, rewards = values * mask, rewards * mask
    advantages, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


class PPO:
    """PPO with a separate critic (see the module docstring); shares ReMax's sampler and log-prob forward."""

    def __init__(self, model: nn.Module, tokenizer, lr: float, config: ReMaxConfig, seed: int) -> None:
        self.sampler = ReMax(model, tokenizer, gloss_reward, config, seed=seed)
        self.model, self.config = model, config
        self.critic = dt.adapt(load_wordnet_lm_model(), dt.LoRAConfig(**LORA))
        self.value_head = nn.Linear(self.critic.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.actor_optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.critic_parameters = [p for p in self.critic.parameters() if p.requires_grad]
        self.critic_parameters += list(self.value_head.parameters())
        self.critic_optimizer = torch.optim.AdamW(self.critic_parameters, lr=lr)
        self.gamma, self.lam, self.clip_ratio, self.clip_value, self.minibatches = 1.0, 0.95, 0.2, 0.2, 2

    def values(self, rollout: Rollout) -> torch.Tensor:
        position_ids = (rollout.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.critic.model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                                   position_ids=position_ids).last_hidden_state
        return self.value_head(hidden[:, rollout.prompt_width - 1:-1]).squeeze(-1)  # V of the state before y_t

    def log_probs(self, rollout: Rollout) -> torch.Tensor:
        logits = self.sampler.response_logits(rollout)
        tokens = rollout.sequences[:, rollout.prompt_width:].unsqueeze(-1)
        return F.log_softmax(logits, dim=-1).gather(-1, tokens).squeeze(-1)

    def step(self, prompts, rows) -> dict:
        rollout = self.sampler.generate(prompts, greedy=False)
        reward = self.sampler.rewards(rollout.texts, rows).clamp(-self.config.reward_clip, self.config.reward_clip)
        mask = rollout.response_mask.to(torch.float32)
        self.model.eval()
        self.critic.eval()
        with torch.no_grad():
            old_log_probs = self.log_probs(rollout)
            with dt.disabled(self.model):
                reference_log_probs = self.log_probs(rollout)
            old_values = self.values(rollout) * mask
            rewards = -self.config.kl_coef * (old_log_probs - reference_log_probs) * mask
            last = mask.sum(dim=1).long() - 1
            rewards[torch.arange(len(prompts)), last] += reward.to(rewards)
            advantages, returns = gae(rewards, old_values, mask, self.gamma, self.lam)
        order = torch.randperm(len(prompts))
        for index in order.chunk(self.minibatches):
            part, m = rows_of(rollout, index), mask[index]
            ratio = torch.exp(self.log_probs(part) - old_log_probs[index])
            a = advantages[index]
            policy_loss = torch.max(-a * ratio, -a * ratio.clamp(1 - self.clip_ratio, 1 + self.clip_ratio))
            policy_loss = (policy_loss * m).sum() / m.sum()
            self.actor_optimizer.zero_grad(set_to_none=True)
            policy_loss.backward()
            self.actor_optimizer.step()
            values, old = self.values(part), old_values[index]
            clipped = old + (values - old).clamp(-self.clip_value, self.clip_value)
            value_loss = 0.5 * (torch.max((values - returns[index]) ** 2, (clipped - returns[index]) ** 2) * m).sum()
            value_loss = value_loss / m.sum()
            self.critic_optimizer.zero_grad(set_to_none=True)
            value_loss.backward()
            self.critic_optimizer.step()
        self.sampler.steps += 1
        return {"reward": float(reward.mean()), "kl_sampled": float(((old_log_probs - reference_log_probs) * mask)
                                                                   .sum() / mask.sum())}


# --- one run (in a child process) -----------------------------------------------------------------------------
def evaluate(model, tokenizer, rows, with_kl: bool) -> dict:
    prompts = prompt_ids_of_rows(tokenizer, rows)
    probe = ReMax(model, tokenizer, gloss_reward, seed=EVAL_SEED)  # its sampler always starts at EVAL_SEED
    texts = probe.generate(prompts, greedy=True).texts
    result = {"reward": float(gloss_reward(texts, rows).mean()),
              "similarity": gloss_similarity(texts, [row["gloss"] for row in rows])}
    if with_kl:
        sampled = probe.generate(prompts, greedy=False)
        with torch.no_grad():
            log_p = F.log_softmax(probe.response_logits(sampled), dim=-1)
            with dt.disabled(model):
                log_ref = F.log_softmax(probe.response_logits(sampled), dim=-1)
            mask = sampled.response_mask.to(log_p.dtype)
            kl = (log_p.exp() * (log_p - log_ref)).sum(-1)
            result["kl"] = float((kl * mask).sum() / mask.sum())
    return result


def state_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run(job: dict, settings: argparse.Namespace) -> dict:
    torch.set_num_threads(settings.threads)
    torch.manual_seed(job["seed"])
    model, tokenizer = load_wordnet_lm()
    dt.adapt(model, dt.LoRAConfig(**LORA))
    rows = read_heldout_rows()
    train = [row for row in rows if row["split"] == "train"]
    random.Random(job["seed"]).shuffle(train)
    validation = [row for row in rows if row["split"] == "validation"][:settings.eval_prompts]
    test = [row for row in rows if row["split"] == "test"][:settings.test_prompts]
    config = ReMaxConfig()
    if job["method"] == "remax":
        remax = ReMax(model, tokenizer, gloss_reward, config, seed=job["seed"])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job["lr"])

        def step(prompts, batch_rows):
            stats = remax.step(optimizer, prompts, batch_rows)
            return {"reward": stats.reward, "baseline_reward": stats.baseline_reward, "kl_sampled": stats.kl_sampled}
        extra = state_bytes(p for p in model.parameters() if p.requires_grad) * 4  # param, grad, 2 moments
    else:
        ppo = PPO(model, tokenizer, job["lr"], config, job["seed"])
        step = ppo.step
        extra = state_bytes(p for p in model.parameters() if p.requires_grad) * 4
        extra += state_bytes(p for p in ppo.critic.parameters() if not p.requires_grad)  # the critic's weights
        extra += state_bytes(ppo.critic_parameters) * 4
    curve, train_log, seconds = [], [], []
    for index in range(settings.steps + 1):
        if index % settings.eval_every == 0 or index == settings.steps:
            curve.append({"step": index, **evaluate(model, tokenizer, validation, with_kl=True)})
            print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
        if index == 0:  # the models, MiniLM and one evaluation are in: what training adds comes after this
            rss_before_training = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if index == settings.steps:
            break
        batch = train[index * settings.batch:(index + 1) * settings.batch]
        start = time.perf_counter()
        train_log.append(step(prompt_ids_of_rows(tokenizer, batch), batch))
        seconds.append(time.perf_counter() - start)
    final_test = evaluate(model, tokenizer, test, with_kl=False)
    return {**job, "curve": curve, "train": train_log, "step_seconds": seconds, "test": final_test,
            "state_bytes": extra, "peak_rss_mib_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_mib_before_training": rss_before_training}


def run_in_child(job: dict, settings: argparse.Namespace) -> dict:
    """A fresh process under /usr/bin/time -v (a child forked from this process would inherit its RSS peak)."""
    command = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", json.dumps(job),
               "--steps", str(settings.steps), "--batch", str(settings.batch), "--eval-every",
               str(settings.eval_every), "--eval-prompts", str(settings.eval_prompts), "--test-prompts",
               str(settings.test_prompts), "--threads", str(settings.threads)]
    done = harness.run_process(command, label=f"run {job}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    line = next(line for line in done.stderr.splitlines() if "Maximum resident set size" in line)
    result["peak_rss_mib"] = int(line.rsplit(":", 1)[1]) / 1024
    return result


def run_until_deadline(jobs: list[dict], log: harness.RunLog, settings: argparse.Namespace) -> bool:
    """Run the pending jobs in order, one fresh process each; stop before a run that would end after
    `--stop-by` (its length guessed as the longest run so far, 4 minutes before the first). True if all ran."""
    durations: list[float] = []
    for job in log.pending(jobs):
        if settings.stop_by is not None and time.time() + max(durations, default=240.0) > settings.stop_by:
            print(f"stopping before {job}: it would end after --stop-by", file=sys.stderr, flush=True)
            return False
        print(f"run {job}", flush=True)
        start = time.time()
        log.append(run_in_child(job, settings))
        durations.append(time.time() - start)
    return True


def stop_time(text: str) -> float:
    """'HH:MM' (UTC, today) as a POSIX time."""
    import datetime

    hours, minutes = map(int, text.split(":"))
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.replace(hour=hours, minute=minutes, second=0, microsecond=0).timestamp()


# --- the report -----------------------------------------------------------------------------------------------
def chosen_lr(records: list[dict], method: str) -> float:
    """The rate with the best final validation reward on the first seed (ties: the smaller rate)."""
    first_seed = min(r["seed"] for r in records)
    tried = [r for r in records if r["method"] == method and r["seed"] == first_seed]
    return max(sorted(tried, key=lambda r: r["lr"]), key=lambda r: r["curve"][-1]["reward"])["lr"]


def reported_lr(records: list[dict], method: str) -> float:
    """The chosen rate if it has as many seeds as any rate of this method, else the rate with the most seeds
    (a run cut short by --stop-by; the report says which rate won on the first seed)."""
    seeds: dict[float, int] = {}
    for r in records:
        if r["method"] == method:
            seeds[r["lr"]] = seeds.get(r["lr"], 0) + 1
    best = chosen_lr(records, method)
    return best if seeds[best] == max(seeds.values()) else max(seeds, key=seeds.get)


def comparable_or_better(remax: list[float], ppo: list[float]) -> str:
    gap = statistics.mean(remax) - statistics.mean(ppo)
    noise = max(statistics.stdev(remax), statistics.stdev(ppo)) if len(remax) > 1 else 0.0
    if gap > noise:
        return f"holds (better: +{gap:.3f}, larger seed std {noise:.3f})"
    if gap >= -noise:
        return f"holds (comparable: {gap:+.3f} within the larger seed std {noise:.3f})"
    return f"does not hold ({gap:+.3f}, larger seed std {noise:.3f})"


def figure_of(chosen: dict[str, list[dict]]):
    plt = harness.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, runs in chosen.items():
        steps = [point["step"] for point in runs[0]["curve"]]
        for axis, key in zip(axes, ("reward", "kl")):
            values = torch.tensor([[point[key] for point in run["curve"]] for run in runs])
            mean, std = values.mean(0), values.std(0) if len(runs) > 1 else torch.zeros(len(steps))
            axis.plot(steps, mean, marker="o", label=f"{method} (lr {runs[0]['lr']:g})")
            axis.fill_between(steps, mean - std, mean + std, alpha=0.2)
    axes[0].set_title("held-out reward (greedy decode, validation prompts)")
    axes[1].set_title("KL(π_θ ‖ π_ref) per token, sampled responses")
    for axis in axes:
        axis.set_xlabel("training step (prompt batches)")
        axis.legend()
    figure.tight_layout()
    return figure


def render(records: list[dict], settings: argparse.Namespace, env: dict, png: Path) -> tuple[str, object]:
    chosen = {m: sorted((r for r in records if r["method"] == m and r["lr"] == reported_lr(records, m)),
                        key=lambda r: r["seed"]) for m in METHODS}
    get = {m: {"test": [r["test"]["reward"] for r in runs], "similarity": [r["test"]["similarity"] for r in runs],
               "valid": [r["curve"][-1]["reward"] for r in runs], "kl": [r["curve"][-1]["kl"] for r in runs],
               "rss": [r["peak_rss_mib"] for r in runs],
               "rss_training": [r["peak_rss_mib_self"] - r["peak_rss_mib_before_training"]
                                for r in runs], "state": [r["state_bytes"] / 2**20 for r in runs],
               "step": [statistics.median(r["step_seconds"]) for r in runs]} for m, runs in chosen.items()}
    start = chosen["remax"][0]["curve"][0]
    lines = ["# ReMax vs a PPO-style baseline (WordNet-LM + LoRA, gloss generation)", "",
             harness.environment_line(env), "", f"Command: `{env['command']}`", "",
             f"{settings.steps} steps × {settings.batch} prompts per method and seed (the same prompts for both); "
             f"LoRA rank 8 on Wq Wv; β 0.05, top-p 0.9, T 1, 24 new tokens; lr grid {settings.lrs} tried on seed 0 "
             f"per method (best final validation reward kept; on seed 0 the best rate was "
             f"{', '.join(f'{m} {chosen_lr(records, m):g}' for m in METHODS)}); seeds {settings.seeds}. "
             "Held-out reward on "
             f"{settings.eval_prompts} validation prompts (greedy), test on {settings.test_prompts} test prompts. "
             f"Before training: validation reward {start['reward']:.3f}, raw similarity {start['similarity']:.3f}.",
             "", "| method | lr | test reward | test raw similarity | final validation reward | final KL/token "
             "| peak RSS (MiB) | peak RSS rise in training (MiB) | model state (MiB) | median step (s) |",
             "|" + " --- |" * 10]
    for m, runs in chosen.items():
        columns = (("test", 3), ("similarity", 3), ("valid", 3), ("kl", 4), ("rss", 1), ("rss_training", 1),
                   ("state", 2), ("step", 2))
        cells = [harness.mean_std(get[m][key], scale=1, digits=digits) for key, digits in columns]
        lines.append(f"| {m} | {runs[0]['lr']:g} | " + " | ".join(cells) + " |")
    rss_gap = [p - r for p, r in zip(get["ppo"]["rss"], get["remax"]["rss"])]
    ratio = [p / r for p, r in zip(get["ppo"]["step"], get["remax"]["step"])]
    memory = "holds" if all(gap > 0 for gap in rss_gap) else "does not hold"
    speed = "holds" if all(x > 1 for x in ratio) else "does not hold"
    lines += ["", "Claims (automatic verdicts; the reading below is by hand):",
              f"- no value model → less memory: {memory} (PPO − ReMax peak RSS per seed: "
              f"{', '.join(f'{gap:.1f}' for gap in rss_gap)} MiB)",
              f"- comparable or better reward (test): {comparable_or_better(get['remax']['test'], get['ppo']['test'])}",
              f"- faster per step (PPO / ReMax median step time per seed: {', '.join(f'{x:.2f}' for x in ratio)}): "
              f"{speed}", "", f"Curves: `{png.name}`.", "", "## Every run", "",
              "| method | lr | seed | validation reward by step | test reward | peak RSS MiB | median step s |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(records, key=lambda r: (r["method"], r["lr"], r["seed"])):
        curve = " ".join(f"{p['reward']:.3f}" for p in r["curve"])
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['seed']} | {curve} | {r['test']['reward']:.3f} | "
                     f"{r['peak_rss_mib']:.1f} | {statistics.median(r['step_seconds']):.2f} |")
    return "\n".join(lines) + "\n", figure_of(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/remax")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--test-prompts", type=int, default=128)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stop-by", type=stop_time, default=None, help="HH:MM UTC: start no run that would end later")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    settings = parser.parse_args(argv)
    if settings.child:
        harness.emit(run(json.loads(settings.child), settings))
        return 0
    env = harness.environment(threads=settings.threads)
    log = harness.RunLog(f"{settings.out}.jsonl", ("method", "lr", "seed"))
    # Under a shared lock the run may be cut short (--stop-by): first every seed at the first rate of the grid,
    # alternating the methods (the comparison itself), then the other rates on the first seed (the grid check).
    main_runs = [{"method": m, "lr": settings.lrs[0], "seed": seed} for seed in settings.seeds for m in METHODS]
    grid = [{"method": m, "lr": lr, "seed": settings.seeds[0]} for lr in settings.lrs[1:] for m in METHODS]
    if run_until_deadline(main_runs, log, settings):
        run_until_deadline(grid, log, settings)
        rest = [{"method": m, "lr": chosen_lr(log.records(), m), "seed": seed} for seed in settings.seeds[1:]
                for m in METHODS]
        run_until_deadline(rest, log, settings)  # a rate better than the first on seed 0 gets every seed too
    if not all(any(r["method"] == m for r in log.records()) for m in METHODS):
        print("not every method has a finished run yet: no report", file=sys.stderr)
        return 1
    png = Path(f"{settings.out}.png")
    markdown, figure = render(log.records(), settings, env, png)
    harness.write_report(f"{settings.out}.md", markdown + harness.kept_notes(f"{settings.out}.md"), {png: figure})
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
