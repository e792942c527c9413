"""`python -m mpl_large.plan`: the memory planner's command (`mpl_large.memory.plan`)."""

from mpl_large.memory.plan import main

if __name__ == "__main__":
    main()
