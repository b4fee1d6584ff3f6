"""Searches over merges: DAREx-q's rescale q, PCB's merge coefficients, M2N2's evolutionary merging."""
