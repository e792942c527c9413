"""Memory of an MPL step: planned before launch (`plan`: meta-device profiles and per-engine arithmetic,
`python -m mpl_large.plan`) and measured on real ranks (`measure`: peak resident memory per phase of a
step), both for one `plan.Workload`."""
