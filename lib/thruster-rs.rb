# frozen_string_literal: true

# Bundler requires a gem by its name; `gem "thruster-rs"` lands here.
require_relative "thruster"
