"""The recipe doctor: what ``mergekit-nan check`` and the stock-command guard find.

Reads recipes, ``config.json`` files, index files and safetensors headers,
never tensor data. ``findings`` is the vocabulary (:class:`Finding`);
``recipe_walk``, ``recipe_names``, ``recipe_limits``, ``recipe_values`` and
``recipe_checks`` judge the parameters; ``safetensors_header``,
``model_files`` and ``model_checks`` the models; ``plan_checks`` mergekit's
plan made from the headers; ``outputs`` where the merge writes; ``estimate``
sizes the job; ``check`` puts it all together for one recipe; ``guard`` makes
the stock ``mergekit-yaml`` and ``mergekit-multi`` speak up.

Imports run one way: the doctor uses the NAN core (the package root), never
the commands.
"""
