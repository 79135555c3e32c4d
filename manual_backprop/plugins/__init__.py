"""Alternative rule sets shipped as plugins of the entry-point group ``manual_backprop.rules``.

The contract a plugin package follows (see `manual_backprop.registry`):

    # pyproject.toml of the plugin package
    [project.entry-points."manual_backprop.rules"]
    my_rules = "my_package.rules"          # an object with register(registry), e.g. a module

    # my_package/rules.py
    def register(registry):
        registry.register(torch.nn.Conv2d, Conv2d)            # add a rule, or
        registry.add_rule_set("my_rules", make_registry)      # offer a whole alternative set

`register` runs the first time a registry that loads plugins is used. If it raises (or
the import does), the plugin is skipped with a `PluginWarning` naming it.

`feedback_alignment` is the worked example: it replaces a built-in rule, so it offers
a rule set (``convert(model, registry="feedback_alignment")``) instead of overriding
torch.nn.Linear for everyone who installs it.

`huggingface` is the worked example of rules for a third-party library's classes
(transformers' Conv1D and GELU modules): it registers them only when that library is
importable, and imports it only then, never when manual_backprop is imported.
"""
