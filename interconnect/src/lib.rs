//! Interconnect verbs API (seed 000). Work in progress.
