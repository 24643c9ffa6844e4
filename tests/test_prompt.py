import pytest

from qmd_unsloth.prompt import (EMPTY_THINK, format_target, messages, parse_completion, qwen3_chat_template,
                                render_example, render_prompt)
from qmd_unsloth.reward import score_expansion

PINNED_PROMPT = ("<|im_start|>user\n/no_think Expand this search query: auth config<|im_end|>\n"
                 "<|im_start|>assistant\n<think>\n\n</think>\n\n")
PAIRS = [("vec", "how do I configure authentication"), ("lex", "auth config"), ("hyde", "Set AUTH_SECRET in .env."),
         ("lex", "authentication settings"), ("vec", "where are auth settings stored")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_messages_are_one_user_turn_without_system_prompt():
    assert messages("  auth config ") == [{"role": "user", "content": "/no_think Expand this search query: auth config"}]


def test_prompt_text_is_pinned_through_the_real_qwen3_template():
    assert "enable_thinking" in qwen3_chat_template()  # it is the real template, shipped inside trl
    assert render_prompt("auth config") == PINNED_PROMPT


def test_tokenizer_chat_template_renders_the_same_prompt(tokenizer):
    via_tokenizer = tokenizer.apply_chat_template(messages("auth config"), tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=False)
    assert via_tokenizer == PINNED_PROMPT == render_prompt("auth config", tokenizer)


def test_target_order_is_hyde_then_lex_then_vec():
    assert format_target(PAIRS) == ("hyde: Set AUTH_SECRET in .env.\nlex: auth config\nlex: authentication settings\n"
                                    "vec: how do I configure authentication\nvec: where are auth settings stored")


def test_empty_think_block_belongs_to_the_prompt_not_the_target(tokenizer):
    ex = render_example("auth config", PAIRS, tokenizer)
    assert ex["prompt"].endswith(EMPTY_THINK)
    assert "<think>" not in ex["completion"]
    assert ex["completion"] == format_target(PAIRS) + "<|im_end|>"
    full = tokenizer.apply_chat_template(messages("auth config") + [{"role": "assistant",
                                                                     "content": format_target(PAIRS)}], tokenize=False)
    assert ex["prompt"] + ex["completion"] + "\n" == full


def test_training_generation_and_eval_prompts_agree_token_for_token(tokenizer):
    ex = render_example("auth config", PAIRS, tokenizer)
    train_ids = tokenizer(ex["prompt"] + ex["completion"], add_special_tokens=False)["input_ids"]
    gen_ids = tokenizer.apply_chat_template(messages("auth config"), tokenize=True, add_generation_prompt=True,
                                            enable_thinking=False, return_dict=False)
    eval_ids = tokenizer(render_prompt("auth config"), add_special_tokens=False)["input_ids"]
    assert train_ids[: len(gen_ids)] == list(gen_ids) == eval_ids
    assert train_ids[-1] == tokenizer.eos_token_id  # the answer ends with <|im_end|>, where generation stops


def test_reward_scores_the_training_completion_and_a_served_one_alike(tokenizer):
    ex = render_example("auth config", PAIRS, tokenizer)
    as_trained = score_expansion("auth config", ex["completion"]).score
    # a server that renders the prompt without the empty think block lets the model write it: no cost
    as_served = score_expansion("auth config", EMPTY_THINK + ex["completion"]).score
    assert as_trained == as_served > 0.8


def test_parse_completion_round_trips_and_skips_junk():
    text = "<think>\n\n</think>\n\n" + format_target(PAIRS) + "\nSure! here you go\n<|im_end|>"
    assert parse_completion(text) == [("hyde", "Set AUTH_SECRET in .env."), ("lex", "auth config"),
                                      ("lex", "authentication settings"),
                                      ("vec", "how do I configure authentication"),
                                      ("vec", "where are auth settings stored")]
    assert format_target(parse_completion(format_target(PAIRS))) == format_target(PAIRS)


def test_fast_renderer_matches_full_rendering(tokenizer):
    from qmd_unsloth.prompt import ExampleRenderer

    render = ExampleRenderer(tokenizer, check_every=1)
    queries = ["auth config", '"go modules" proxy', "C++ {{ raw }} {% x %}", "café ünïcode", "a\\nb"]
    for q in queries:
        assert render(q, PAIRS) == render_example(q, PAIRS, tokenizer)
    assert render.fast  # no difference was found, so the fast path stayed on


def test_fast_renderer_falls_back_when_a_template_transforms_content():
    from qmd_unsloth.prompt import ExampleRenderer

    # a template that rewrites words of the user's text: placeholders cannot see that, the first-row check does
    tmpl = ("{% for m in messages %}<{{ m.role }}>{% if m.role == 'user' %}{{ m.content | replace('auth', 'AUTH') }}"
            "{% else %}{{ m.content }}{% endif %}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    render = ExampleRenderer(tmpl)
    assert render("auth config", PAIRS) == render_example("auth config", PAIRS, tmpl)
    assert "AUTH config" in render("auth config", PAIRS)["prompt"]
    assert not render.fast
