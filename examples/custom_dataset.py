"""A custom dataset: write rows in the common RL layout that `data.train_files` reads.

Each JSONL line is one row: `prompt` (chat messages, or a plain string), `ground_truth`, and
optional `extra_info` (anything the reward or the environment needs) and `data_source`. This
one asks which country a city is in, and gives each row a few facts for the search tool of
examples/custom_env.py. Parquet files with the same columns work too.

    python examples/custom_dataset.py /tmp/cities.jsonl --rows 512
"""

import argparse
import json
import random

CITIES = {
    "Lyon": "France", "Nice": "France", "Porto": "Portugal", "Lisbon": "Portugal", "Milan": "Italy",
    "Naples": "Italy", "Munich": "Germany", "Hamburg": "Germany", "Seville": "Spain", "Valencia": "Spain",
    "Krakow": "Poland", "Gdansk": "Poland", "Osaka": "Japan", "Kyoto": "Japan", "Busan": "Korea",
    "Cork": "Ireland", "Bergen": "Norway", "Malmo": "Sweden", "Tampere": "Finland", "Ghent": "Belgium",
}


def make_rows(num_rows: int, seed: int = 0, facts_per_row: int = 3) -> list[dict]:
    """Rows as dicts in the layout verl_async.data.rows.load_rows reads."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        city = rng.choice(sorted(CITIES))
        others = rng.sample([c for c in sorted(CITIES) if c != city], facts_per_row - 1)
        facts = [f"{c} is in {CITIES[c]}." for c in [city, *others]]
        rng.shuffle(facts)
        rows.append({
            "id": f"cities-{seed}-{i}",
            "prompt": [{"role": "user", "content": f"Which country is {city} in? Search first, then answer."}],
            "ground_truth": CITIES[city],
            "extra_info": {"facts": facts},
            "data_source": "cities",
        })
    return rows


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the JSONL file to write")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_jsonl(make_rows(args.rows, args.seed), args.out)


if __name__ == "__main__":
    main()
