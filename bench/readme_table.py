"""Print the README's benchmark table from a report JSON (python -m bench.readme_table [path]), so the
README quotes the committed results verbatim."""
import json
import sys

PEERS = ("sdpa_dense", "flex", "per_scale_sdpa", "reference")


def main(path="bench/results/next_scale_cpu.json"):
    d = json.load(open(path))
    rows = {(r["config"], r["op"], r["peer"]): r for r in d["rows"]}
    print("| config | op | hierkern ms (GFLOP/s, peak MB) | SDPA dense mask | compiled flex | per-scale SDPA loop | eager reference |")
    print("|---|---|---|---|---|---|---|")
    for cfg in dict.fromkeys(r["config"] for r in d["rows"]):
        for op in ("fwd", "fwd+bwd"):
            h = rows.get((cfg, op, "hierkern"))
            if h is None or h["median_ms"] is None:
                continue
            cells = [f"{h['median_ms']:.1f} ({h['tflops'] * 1e3:.0f}, {h['peak_mb']:.1f})"]
            for p in PEERS:
                r = rows.get((cfg, op, p))
                ok = r is not None and r["median_ms"] is not None
                cells.append(f"{r['median_ms']:.1f} ({r['ratio']:.2f}x)" if ok else "n/a")
            name = cfg.split(" B")[0]
            print(f"| {name} | {op} | " + " | ".join(cells) + " |")
    masks = [f"{r['config'].split(' B')[0]}: {r['median_ms']:.1f} ms" for r in d["rows"] if r["op"] == "mask"]
    print("\ncreate_block_mask (timed on its own): " + ", ".join(masks))
    print("\nTargets:")
    for t in d["targets"]:
        print(f"- {t['status']} {t['target']} [{t['config'].split(' B')[0]}]: {t['value']:.2f}x")


if __name__ == "__main__":
    main(*sys.argv[1:])
