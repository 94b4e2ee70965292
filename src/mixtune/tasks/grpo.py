"""`task: grpo`: reinforcement tuning of a chat VLM with TRL's GRPOTrainer and reward functions (tasks/rewards.py).

Prompts come from any chat dataset: each sample's conversation up to its last user turn is the prompt, and its
last assistant turn (if any) is the reference answer the rewards check (`answer`). Generation is TRL's:
transformers' `generate` on the CPU or one GPU, vLLM when `trl: {use_vllm: true}` and vLLM is installed. Group
size, KL beta, clipping and the rest are GRPOConfig's options under `trl:` as TRL names them
(`num_generations`, `max_completion_length`, `beta`, `epsilon`, `temperature`, `reward_weights`, ...).

Prompts render with the chat template SFT trained with (the checkpoint's own, or the family's default for a
checkpoint that ships none), so GRPO asks what SFT taught and `mixtune predict` asks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from mixtune.data.conversation import Conversation
from mixtune.data.dataset import ImagePrep
from mixtune.data.formats import get_reader
from mixtune.data.templates import make_renderer, to_messages
from mixtune.errors import ConfigError
from mixtune.prompting import check_prompt, prompt_part, reference_of
from mixtune.tasks import TaskData
from mixtune.tasks.chat import load  # noqa: F401  (a GRPO run loads its checkpoint as chat SFT does)
from mixtune.tasks.rewards import NEEDS_ANSWER, reward_functions
from mixtune.tasks.samples import build_sample_split, eval_argument
from mixtune.tasks.trl_bridge import import_trl, mix_with, stand_in, trl_args

log = logging.getLogger("mixtune")


@dataclass
class PromptSample:
    prompt: Conversation  # ends on the user turn to answer
    answer: str | None  # the reference the rewards check


def read_prompts(entry, bad, need_answer: bool) -> list[PromptSample]:
    out = []
    for conv in get_reader(entry.name)(entry, bad):
        with bad.catch():
            answer = reference_of(conv)
            if need_answer and answer is None:
                raise conv.error("no reference answer (a last assistant turn) for exact_match / boxed_accuracy "
                                 "to check", "messages")
            out.append(PromptSample(check_prompt(prompt_part(conv.validate())), answer))
    return out


@dataclass
class PromptPrep:
    """A prompt sample -> the row TRL's GRPOTrainer reads: conversational `prompt` with image parts, the decoded
    `images`, and `answer` (passed on to the reward functions)."""
    images: ImagePrep

    def __call__(self, sample: PromptSample) -> dict:
        media = [self.images.fit(m) for m in self.images.decode(sample.prompt)]
        return {"prompt": to_messages(sample.prompt), "images": media, "answer": sample.answer or ""}


def build_data(config, family, model, processor) -> TaskData:
    import_trl()
    mix = config.mix
    rewards = reward_functions(list(mix.reward_funcs))
    if not family.uses_chat_template:
        raise ConfigError(f"the {family.name} family has no chat template for TRL to prompt with", key="task")
    need_answer = any(name in NEEDS_ANSWER for name in mix.reward_funcs)
    read = partial(read_prompts, need_answer=need_answer)
    prep = PromptPrep(ImagePrep())
    train = build_sample_split(config, "train", read, prep, "grpo")
    evals = build_sample_split(config, "eval", read, prep, "grpo")
    if train is None:
        raise ConfigError("has no entries", key="dataset.train")
    render = make_renderer(processor, None, family.image_placeholder, family.default_chat_template)
    skipped = train.skipped + (evals.skipped if evals is not None else [])
    return TaskData(train=train, eval=eval_argument(evals), collator=None, skipped=skipped,
                    trainer_class=grpo_trainer_class(dict(mix.trl), rewards, getattr(render, "template", None)))


def grpo_trainer_class(options: dict, rewards: list, chat_template: str | None):
    trl = import_trl()

    class GRPOTaskTrainer(mix_with(trl.GRPOTrainer)):
        def __init__(self, *, model, args, train_dataset, eval_dataset=None, data_collator=None,
                     processing_class=None, compute_metrics=None, callbacks=None):
            # data_collator: GRPO batches raw rows itself (generation happens inside the step)
            row = {"prompt": [{"role": "user", "content": [{"type": "text", "text": ""}]}], "images": [],
                   "answer": ""}
            super().__init__(model=model, reward_funcs=rewards, args=trl_args(args, trl.GRPOConfig, options, {}),
                             train_dataset=stand_in(row), eval_dataset=eval_dataset,
                             processing_class=processing_class, callbacks=callbacks)
            self.train_dataset = train_dataset
            if chat_template is not None:  # the family's default template, for a checkpoint that ships none
                self.chat_template = chat_template

    return GRPOTaskTrainer
