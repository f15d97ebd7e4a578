"""LoRA adapter recipes: NAN coefficients per module (``coefficients``) and one adapter out
(``merge``), computed from the factors."""
