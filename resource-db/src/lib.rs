//! Transactional resource map (seed 001 resource database). Work in progress.
