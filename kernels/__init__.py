"""Attention kernels that run on the virtual cache; import as `vattn.kernels`.

Never import this folder as a top-level `kernels`: transformers probes for an unrelated
package of that name.
"""
