"""The job's HTML report: the plan and the run drawn from the summary and the step trace."""
