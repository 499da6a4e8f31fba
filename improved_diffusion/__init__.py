"""
Denoising diffusion models (DDPM, and DDIM with timestep respacing) in the
layout and API of openai/improved-diffusion. Importing has no side effects and
does not need MPI.
"""
