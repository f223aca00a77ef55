# frozen_string_literal: true

module Thruster
  # basecamp's `thruster` gem (in Rails 7.2+/8 Gemfiles) also defines the
  # `Thruster` module and an `exe/thrust`. With both in one bundle, which
  # `thrust` runs depends on load order, so say so loudly.
  module Conflict
    MESSAGE = <<~MSG
      thruster-rs: basecamp's `thruster` gem is also loaded. Both provide `Thruster` and the `thrust`
      command, so which one runs depends on load order. thruster-rs replaces it: remove `gem "thruster"`
      from your Gemfile (keep `gem "thruster-rs"`).
    MSG

    def self.present?
      Gem.loaded_specs.key?("thruster")
    end

    def self.warn_if_present(io = $stderr)
      return false unless present?

      io.puts(MESSAGE)
      true
    end
  end
end
