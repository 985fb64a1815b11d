"""The Markdown results table: KnowEdit layout x100, perplexity unscaled, dashes, no "-0.00"."""

from lit_edit.report import markdown_table


def test_markdown_table_by_hand():
    summary = {
        "reliability": 0.9346,
        "generalization": 0.25,
        "portability": None,
        "locality": 0.5,
        "perplexity": 12.345,
        "EM": -0.00001,
        "n_records": 200,
        "pre": {"reliability": 0.1338, "perplexity": 20.0},
        "breakdown": {"locality/neighborhood": 0.4},
    }
    lines = markdown_table(summary, "MENDEditor").splitlines()
    assert lines[0] == "| Method | Edit Succ. | Generalization | Portability | Locality | Fluency |"
    assert lines[2] == "| MENDEditor | 93.46 | 25.00 | – | 50.00 | – |"
    assert "| reliability | 13.38 | 93.46 |" in lines
    assert "| portability | – | – |" in lines
    assert "| perplexity | 20.00 | 12.35 |" in lines  # not scaled
    assert "| EM | – | 0.00 |" in lines  # a tiny negative magnitude is not printed as -0.00
    assert not any("n_records" in line or "breakdown" in line for line in lines)
