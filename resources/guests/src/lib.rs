//! Builds the no_std test guest. Work in progress.
