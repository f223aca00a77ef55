# frozen_string_literal: true

# Bundler requires a gem by its name; `gem "thruster-rs"` lands here.
require_relative "thruster"
# The Puma plugin loads lib/thruster.rb before Rails exists; Bundler.require
# then comes here after `require "rails"`: load the Railtie now (the hook
# would also load it once the app class is defined).
Thruster::RailtieHook.install
