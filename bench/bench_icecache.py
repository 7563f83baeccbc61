"""IceCache vs baselines on the testbed recall model (see scrimp/icecache/bench.py for the tables).

    python bench/bench_icecache.py [--n 30] [--context 2048] [--json out.json]
"""
from scrimp.icecache.bench import main

if __name__ == "__main__":
    main()
