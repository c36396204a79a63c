"""The benchmark families of `bertfast bench`: each module has TITLE, NOTES and groups(ctx) (and may have summary)."""
