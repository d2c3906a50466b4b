"""cmedl_jax: unpaired Cross-Modality Educed DistiLlation (CMEDL) in JAX/Flax.

A CT->MRI translator produces pseudo-MRI (pMRI) from labelled CT, a teacher segments the pMRI and a student CT
segmenter is distilled from the teacher's decoder features. Only the student is used at test time.
"""

__version__ = "0.1.0"
