"""Writes frases/{train,validation}.jsonl from the temas sentences (run from this directory):
every sentence once as written ("natural") and once with a quarter of its words (at least
two) replaced by words of other sentences of the same split ("corrompida"), a small
acceptability task in the spirit of CoLA, and the skill replaced-token detection pretrains."""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def words(sentence: str) -> list[str]:
    return sentence.rstrip(".").split()


def corrupt(sentence: str, rng: random.Random, pool: list[str]) -> str:
    out = words(sentence)
    for i in rng.sample(range(len(out)), max(2, round(0.25 * len(out)))):
        replacement = rng.choice(pool)
        while replacement.lower() == out[i].lower():
            replacement = rng.choice(pool)
        out[i] = replacement
    return " ".join(out) + "."


def main() -> None:
    for split in ("train", "validation"):
        lines = (HERE / "temas" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        sentences = [json.loads(line)["texto"] for line in lines]
        pool = [w for s in sentences for w in words(s) if len(w) > 3]
        rng = random.Random(split)
        rows = []
        for s in sentences:
            rows.append({"frase": s, "rotulo": "natural"})
            rows.append({"frase": corrupt(s, rng, pool), "rotulo": "corrompida"})
        rng.shuffle(rows)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (HERE / "frases" / f"{split}.jsonl").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
