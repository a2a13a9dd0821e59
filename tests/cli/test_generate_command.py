"""fasttune generate: the printed reply is the API's greedy reply; several prompts run as one left-padded batch
and give each prompt's own reply."""
from fasttune import FastLanguageModel
from fasttune.cli import main
from fasttune.generate import generate_text


def test_generate_prints_the_api_reply(tiny_model_dir, capsys):
    folder = tiny_model_dir("qwen2")
    assert main(["generate", "--model", str(folder), "--prompt", "hello there", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    model, tok = FastLanguageModel.from_pretrained(str(folder))
    assert printed == generate_text(model, tok, "hello there", max_new_tokens=6) + "\n"


def test_generate_batch_equals_single_prompts(tiny_model_dir, capsys):
    folder = str(tiny_model_dir("llama"))
    prompts = ["hi", "a much longer prompt than the first one"]
    singles = []
    for p in prompts:
        main(["generate", "--model", folder, "--prompt", p, "--max-new-tokens", "5"])
        singles.append(capsys.readouterr().out.removesuffix("\n"))
    assert main(["generate", "--model", folder, "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert printed == "".join(f"### {p}\n{s}\n\n" for p, s in zip(prompts, singles))


def test_generate_sampling_is_seeded(tiny_model_dir, capsys):
    args = ["generate", "--model", str(tiny_model_dir("llama")), "--prompt", "hi", "--max-new-tokens", "8",
            "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--seed", "3"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_generate_bad_top_p(tiny_model_dir, capsys):
    rc = main(["generate", "--model", str(tiny_model_dir("llama")), "--prompt", "hi", "--top-p", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "top_p" in err and "Traceback" not in err
