"""Reference entries of the placement leaderboard, each a submission file (NAME, PLACEMENT, policy)."""
