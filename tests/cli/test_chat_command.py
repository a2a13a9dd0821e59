"""fasttune chat: multi-turn history through the chat template, /reset, /exit and Ctrl-D (EOF), context trimming."""
import subprocess
import sys

import pytest

import fasttune.generate as generation
from fasttune.cli import main
from fasttune.commands.chat import fit_context


@pytest.fixture
def chat_run(tiny_model_dir, monkeypatch, capsys):
    """Run `fasttune chat` on typed lines; returns (stdout, the decoded prompt of every reply)."""
    from fasttune import FastLanguageModel

    folder = tiny_model_dir("llama")
    _, tok = FastLanguageModel.from_pretrained(str(folder))
    prompts = []
    real = generation.generate

    def spy(model, input_ids, *a, **kw):
        prompts.append(tok.decode(input_ids[0]))
        return real(model, input_ids, *a, **kw)

    monkeypatch.setattr(generation, "generate", spy)

    def run(lines, extra=()):
        feed = iter(lines)

        def fake_input(prompt=""):
            print(prompt, end="")
            try:
                return next(feed)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr("builtins.input", fake_input)
        rc = main(["chat", "--model", str(folder), "--max-new-tokens", "4", "--seed", "0", *extra])
        return rc, capsys.readouterr().out, prompts

    return run


def test_multi_turn_reset_and_exit(chat_run):
    rc, out, prompts = chat_run(["first question", "second question", "/reset", "third", "/exit", "never read"])
    assert rc == 0 and "(conversation cleared)" in out
    assert len(prompts) == 3
    assert "first question" in prompts[1] and "second question" in prompts[1]  # history carried
    assert prompts[1].count("<|im_start|>assistant") == 2  # the first reply is in the history
    assert "first question" not in prompts[2] and "third" in prompts[2]  # after /reset
    assert out.count(">>> ") == 5  # /exit ended it: the last line was never read


def test_ctrl_d_ends_and_system_message_stays(chat_run):
    rc, out, prompts = chat_run(["hi", "/help"], extra=["--system", "be brief"])
    assert rc == 0 and "Unknown command /help" in out
    assert prompts == [prompts[0]] and prompts[0].startswith("<|im_start|>system\nbe brief")


def test_fit_context_drops_oldest_turns(tiny_tokenizer):
    history = [{"role": "system", "content": "s"}]
    for i in range(4):
        history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    history.append({"role": "user", "content": "last"})
    kept, ids = fit_context(tiny_tokenizer, history, budget=80)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last" and len(ids) <= 80
    assert len(kept) < len(history) and kept[1]["role"] == "user"


def test_chat_through_the_console_script(tiny_model_dir):
    """A real process reading stdin: two turns, then end of input (Ctrl-D)."""
    proc = subprocess.run([sys.executable, "-m", "fasttune.cli", "chat", "--model", str(tiny_model_dir("llama")),
                           "--max-new-tokens", "3"], input="hello\nhow are you\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("fasttune chat with ") and proc.stdout.count(">>> ") == 3


NO_SYSTEM_TEMPLATE = (  # Gemma (1/2) style: the template refuses a system message
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.mark.parametrize("template, system, words", [
    (NO_SYSTEM_TEMPLATE, ["--system", "be brief"],
     "--system: this model's chat template has no system role (it says: System role not supported), so the "
     "conversation cannot start with a system message. Drop --system and put the instructions into your first "
     "message instead."),
    ("{{ raise_exception('broken template') }}", [],
     "This model's chat template cannot render a conversation (it says: broken template). Fix the tokenizer's "
     "chat_template"),
])
def test_template_that_refuses_the_conversation_fails_before_the_first_prompt(template, system, words,
                                                                              tiny_model_dir, monkeypatch, capsys):
    """Before: a jinja traceback after the first message was typed."""
    from transformers import AutoTokenizer

    folder = tiny_model_dir("llama")
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = template
    tok.save_pretrained(str(folder))
    monkeypatch.setattr("builtins.input", lambda prompt="": pytest.fail("prompted despite the template"))
    assert main(["chat", "--model", str(folder), *system]) == 2
    captured = capsys.readouterr()
    assert f"fasttune: error: {words}" in captured.err and "Traceback" not in captured.err
    assert ">>> " not in captured.out


def test_system_message_with_a_template_that_has_no_system_role_works_without_it(tiny_model_dir, monkeypatch,
                                                                                  capsys):
    from transformers import AutoTokenizer

    folder = tiny_model_dir("llama")
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = NO_SYSTEM_TEMPLATE
    tok.save_pretrained(str(folder))
    lines = iter(["hi"])

    def fake_input(prompt=""):
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--model", str(folder), "--max-new-tokens", "2"]) == 0  # the probe did not refuse it
    assert capsys.readouterr().out.count(">>> ") == 2
