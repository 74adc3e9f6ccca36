"""The README's results table is exactly what the committed CSVs give."""
import perf.report


def test_readme_results_table_matches_the_csvs():
    perf.report.main(["--check"])
