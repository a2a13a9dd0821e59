"""Built-in GRPO reward functions and how reward specs are parsed; bad specs are ConfigErrors naming the field."""
import pytest

from fasttune import GRPOConfig
from fasttune.errors import ConfigError
from fasttune.train.rewards import builtin_reward, required_columns, resolve_reward_funcs, reward_name, split_specs


def _call(func, completions, **columns):
    ids = [[0] * len(c if isinstance(c, str) else c[-1]["content"]) for c in completions]
    return func(prompts=["p"] * len(completions), completions=completions, completion_ids=ids, **columns)


def test_exact_match_strips_and_reads_messages():
    f = builtin_reward("exact_match", 16)
    assert _call(f, [" 42\n", "41", "42."], answer=["42", "42", 42]) == [1.0, 0.0, 0.0]
    chat = [[{"role": "assistant", "content": "7"}], [{"role": "assistant", "content": "8"}]]
    assert _call(f, chat, answer=["7", "7"]) == [1.0, 0.0]
    assert reward_name(f) == "exact_match"


def test_regex_searches_with_the_users_anchors():
    f = builtin_reward(r"regex:^Answer: \d+$", 16)
    assert _call(f, ["Answer: 12", "Answer: 12 apples", "So. Answer: 3"]) == [1.0, 0.0, 0.0]
    assert _call(builtin_reward(r"regex:\d", 16), ["a1", "ab"]) == [1.0, 0.0]
    assert reward_name(f) == r"regex:^Answer: \d+$"


def test_length_prefers_short_completions():
    assert _call(builtin_reward("length", 10), ["ab", "a" * 10, "a" * 15]) == [0.8, 0.0, 0.0]
    assert _call(builtin_reward("length:4", 10), ["ab"]) == [0.5]


def test_specs_from_cli_and_yaml():
    assert split_specs("exact_match, length,regex:^a,b$") == ["exact_match", "length", "regex:^a,b$"]
    funcs = resolve_reward_funcs(["exact_match", "regex:^x, y$", len], 8)  # a list item is one spec
    assert [reward_name(f) for f in funcs] == ["exact_match", "regex:^x, y$", "len"]
    assert GRPOConfig(reward_funcs="exact_match,length").reward_funcs == "exact_match,length"


@pytest.mark.parametrize("spec,message", [
    ("exact", "unknown reward function 'exact'.*exact_match"),
    ("regex:(unclosed", "not a valid regular expression"),
    ("regex:", "needs a pattern"),
    ("length:zero", "length:<n>"),
    ("length:0", "length:<n>"),
])
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(ConfigError, match=f"^reward_funcs: .*{message}"):
        GRPOConfig(reward_funcs=[spec])
    with pytest.raises(ConfigError, match=message):
        resolve_reward_funcs(spec, 8)


def test_no_reward_function_and_non_callables():
    with pytest.raises(ConfigError, match="at least one reward function"):
        resolve_reward_funcs([], 8)
    with pytest.raises(ConfigError, match="neither a built-in name nor a callable"):
        resolve_reward_funcs([3], 8)


def test_required_columns_from_signatures():
    def f(prompts, completions, answer, difficulty=1, **kwargs):
        return [0.0] * len(completions)

    assert required_columns(f) == ("answer",)
    assert required_columns(builtin_reward("exact_match", 8)) == ("answer",)
    assert required_columns(builtin_reward("length", 8)) == ()
    assert required_columns(len) == ()


def test_a_reward_model_folder_is_named_after_its_run(tmp_path):
    """model:<folder> names its metrics after the folder, or after the run for fasttune's adapter/ and model/."""
    from fasttune.train.rewards import builtin_reward

    (tmp_path / "rm" / "adapter").mkdir(parents=True)
    assert builtin_reward(f"model:{tmp_path / 'rm' / 'adapter'}", 8).__name__ == "rm"
    assert builtin_reward(f"model:{tmp_path / 'rm'}", 8).__name__ == "rm"
