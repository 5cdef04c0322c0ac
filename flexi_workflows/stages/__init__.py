"""Pipeline stages (score → route → train → evaluate); each exchanges data only through the files
it records in its folder under the recipe's output_dir."""
